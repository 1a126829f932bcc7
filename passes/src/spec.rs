//! The RON form of a pass in a pipeline file.

use crate::exits::{HeadKind, InsertExits};
use crate::gemfilter::GemFilter;
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
    /// GemFilter: layers `0..=filter_layer` (0-based) score the prompt's tokens by the last
    /// position's query, and the full model runs on the `keep` best (or the `keep_fraction`
    /// best share) after an average pool of kernel `pool` (odd, 5 by default); `keep_first`
    /// and `keep_last` (0 by default, as in the reference) reserve kept tokens for the
    /// prompt's first and last positions.
    GemFilter {
        filter_layer: usize,
        #[serde(default)]
        keep: Option<usize>,
        #[serde(default)]
        keep_fraction: Option<f64>,
        #[serde(default = "default_pool")]
        pool: usize,
        #[serde(default)]
        keep_first: usize,
        #[serde(default)]
        keep_last: usize,
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

fn default_pool() -> usize {
    5
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
            PassSpec::GemFilter {
                filter_layer,
                keep,
                keep_fraction,
                pool,
                keep_first,
                keep_last,
            } => Box::new(GemFilter {
                filter_layer: *filter_layer,
                keep: *keep,
                keep_fraction: *keep_fraction,
                pool: *pool,
                keep_first: *keep_first,
                keep_last: *keep_last,
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
        // Pipelines are read with RON's implicit `Some`, so `keep: 1024` reads as `Some(1024)`.
        let implicit = ron::Options::default()
            .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
        assert_eq!(
            implicit
                .from_str::<PassSpec>("GemFilter(filter_layer: 3, keep: 1024)")
                .unwrap(),
            PassSpec::GemFilter {
                filter_layer: 3,
                keep: Some(1024),
                keep_fraction: None,
                pool: 5,
                keep_first: 0,
                keep_last: 0,
            }
        );
        assert_eq!(
            implicit
                .from_str::<PassSpec>("GemFilter(filter_layer: 0, keep_fraction: 0.125, pool: 3)")
                .unwrap(),
            PassSpec::GemFilter {
                filter_layer: 0,
                keep: None,
                keep_fraction: Some(0.125),
                pool: 3,
                keep_first: 0,
                keep_last: 0,
            }
        );
        assert_eq!(
            implicit
                .from_str::<PassSpec>(
                    "GemFilter(filter_layer: 1, keep: 256, keep_first: 1, keep_last: 4)"
                )
                .unwrap(),
            PassSpec::GemFilter {
                filter_layer: 1,
                keep: Some(256),
                keep_fraction: None,
                pool: 5,
                keep_first: 1,
                keep_last: 4,
            }
        );
        assert!(
            ron::from_str::<PassSpec>("GemFilter(filter_layer: 1, keep: 8, kernel: 5)").is_err()
        );
        assert!(ron::from_str::<PassSpec>("DepthLora(rank: Fulll)").is_err());
    }
}
