//! Runs passes in order, verifying after each.

use crate::{Pass, PassContext, PassError, PassReport};
use exitgraph_ir::{verify, Graph};

/// One pass's name and report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassOutcome {
    pub pass: &'static str,
    pub report: PassReport,
}

/// An ordered list of passes.
#[derive(Default)]
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> Self {
        PassManager { passes }
    }

    /// Runs every pass on `graph`, checking [`verify`] before the first and after each.
    pub fn run(&self, graph: &mut Graph) -> Result<Vec<PassOutcome>, PassError> {
        self.run_in(graph, &PassContext::detached())
    }

    /// [`PassManager::run`] with files resolved by `cx` (a pipeline's passes).
    pub fn run_in(
        &self,
        graph: &mut Graph,
        cx: &PassContext,
    ) -> Result<Vec<PassOutcome>, PassError> {
        verify(graph).map_err(|cause| PassError::Broken {
            pass: "import",
            cause,
        })?;
        let mut outcomes = Vec::with_capacity(self.passes.len());
        for pass in &self.passes {
            let report = pass.run(graph, cx)?;
            verify(graph).map_err(|cause| PassError::Broken {
                pass: pass.name(),
                cause,
            })?;
            outcomes.push(PassOutcome {
                pass: pass.name(),
                report,
            });
        }
        Ok(outcomes)
    }
}
