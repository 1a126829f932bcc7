//! The RON form of a pass in a pipeline file.

use crate::exits::{HeadKind, InsertExits};
use crate::recursive::{DepthLora, LoraInit, LoraRank, LoraTarget, TieInit, TieLayers, TieNorms};
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
    /// Relaxed Recursive Transformers: tie the L layers into one block of L / `loops` layers
    /// run `loops` times (`init`: Stepwise, Average or Lower; `norms`: Shared or
    /// PerIteration).
    /// `weights` names a safetensors file of trained block weights (`exitgraph train
    /// recursive --train-shared` writes it).
    TieLayers {
        loops: usize,
        #[serde(default)]
        init: TieInit,
        #[serde(default)]
        norms: TieNorms,
        #[serde(default)]
        weights: Option<String>,
    },
    /// A low-rank adapter per loop iteration and layer position on the tied block's
    /// projections (`targets`, all by default), initialised by truncated SVD of each original
    /// layer's residual from the shared weights (`Svd`) or as zero (`Zero`); `weights` names
    /// a safetensors file of trained adapters (`exitgraph train recursive` writes it).
    DepthLora {
        rank: LoraRank,
        #[serde(default = "all_targets")]
        targets: Vec<LoraTarget>,
        #[serde(default)]
        init: LoraInit,
        #[serde(default)]
        weights: Option<String>,
    },
}

fn all_targets() -> Vec<LoraTarget> {
    use LoraTarget::*;
    vec![q, k, v, o, gate, up, down]
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
            PassSpec::TieLayers {
                loops,
                init,
                norms,
                weights,
            } => Box::new(TieLayers {
                loops: *loops,
                init: *init,
                norms: *norms,
                weights: weights.clone(),
            }),
            PassSpec::DepthLora {
                rank,
                targets,
                init,
                weights,
            } => Box::new(DepthLora {
                rank: *rank,
                targets: targets.clone(),
                init: *init,
                weights: weights.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recursive_passes_read_from_ron() {
        let p: Vec<PassSpec> = ron::from_str(
            "[TieLayers(loops: 2, init: Average, norms: PerIteration), DepthLora(rank: Rank(8)), DepthLora(rank: Full, targets: [q, v], init: Zero)]",
        )
        .unwrap();
        assert_eq!(
            p[0],
            PassSpec::TieLayers {
                loops: 2,
                init: TieInit::Average,
                norms: TieNorms::PerIteration,
                weights: None
            }
        );
        assert_eq!(
            p[1],
            PassSpec::DepthLora {
                rank: LoraRank::Rank(8),
                targets: all_targets(),
                init: LoraInit::Svd,
                weights: None
            }
        );
        assert_eq!(
            p[2],
            PassSpec::DepthLora {
                rank: LoraRank::Full,
                targets: vec![LoraTarget::q, LoraTarget::v],
                init: LoraInit::Zero,
                weights: None
            }
        );
        assert!(ron::from_str::<PassSpec>("TieLayers(loops: 2, init: Middle)").is_err());
        assert!(ron::from_str::<PassSpec>("DepthLora(rank: Fulll)").is_err());
    }
}
