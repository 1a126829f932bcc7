//! The RON form of a pass in a pipeline file.

use crate::exits::{HeadKind, InsertExits};
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
    /// Exit heads after the layers in `after` (or every `every` layers), of kind `head`,
    /// with a learned gate each when `gate`; `weights` names the safetensors file of trained
    /// heads and gates (relative to the pipeline file; `exitgraph train exits` writes it).
    InsertExits {
        #[serde(default)]
        after: Vec<usize>,
        /// 0: not used.
        #[serde(default)]
        every: usize,
        #[serde(default)]
        head: HeadKind,
        #[serde(default)]
        gate: bool,
        #[serde(default)]
        weights: Option<String>,
    },
}

impl PassSpec {
    /// The pass this spec describes.
    pub fn build(&self) -> Box<dyn Pass> {
        match self {
            PassSpec::TruncateLayers { keep } => Box::new(TruncateLayers { keep: *keep }),
            PassSpec::InsertExits {
                after,
                every,
                head,
                gate,
                weights,
            } => Box::new(InsertExits {
                after: after.clone(),
                every: (*every > 0).then_some(*every),
                head: head.clone(),
                gate: *gate,
                weights: weights.clone(),
            }),
        }
    }
}
