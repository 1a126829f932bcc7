//! The RON form of a pass in a pipeline file.

use crate::truncate::TruncateLayers;
use crate::Pass;
use serde::{Deserialize, Serialize};

/// A pass as written in a pipeline's `passes: [...]` list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum PassSpec {
    /// Keep the first `keep` transformer layers; the final norm and heads read layer `keep`'s
    /// output (a shallow sub-network, as Kangaroo drafts with).
    TruncateLayers { keep: usize },
}

impl PassSpec {
    /// The pass this spec describes.
    pub fn build(&self) -> Box<dyn Pass> {
        match self {
            PassSpec::TruncateLayers { keep } => Box::new(TruncateLayers { keep: *keep }),
        }
    }
}
