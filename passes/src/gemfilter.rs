//! `GemFilter`: early layers pick the prompt tokens the full model runs on (Shi et al., 2024,
//! "Discovering the Gems in Early Layers").
//!
//! The pass adds the select phase to the graph: a [`Op::QueryKeyScores`] node reading the
//! normed input of layer `filter_layer` (0-based, the reference implementation's
//! `select_layer_idx`) with a copy of that layer's attention op (the same weights), exposed
//! as the output `gemfilter.scores`, and the typed [`Filter`] record the lowering and the
//! runtime read: a request's prompt first runs layers `0..filter_layer` and that layer's norm,
//! q and k; the `keep` best-scoring positions after average pooling (kernel `pool`) are kept
//! in prompt order, and the full model runs afresh on those tokens (positions `0..k`, a fresh
//! KV cache), then decodes as usual. `keep_first` / `keep_last` (0 by default, as in the
//! reference, which forces nothing) reserve kept tokens for the prompt's first and last
//! positions: a documented deviation for models whose filter layer does not score its own
//! question or its start token.
//!
//! **Invariant**: every existing node, edge, output and record is unchanged (the graph gains
//! one node and one output), so a prompt no longer than `keep` runs exactly as in the original
//! model.

use crate::{Pass, PassContext, PassError, PassReport};
use exitgraph_ir::structure::{check_forced, check_keep_and_pool};
use exitgraph_ir::{Filter, Graph, Keep, Node, Op, Shape};

/// Name of the scores node and output.
pub const SCORES: &str = "gemfilter.scores";

/// The pass, as a pipeline names it: `GemFilter(filter_layer: r, keep: k, pool: 5)` or with
/// `keep_fraction: f` instead of `keep` (exactly one of the two), and optionally
/// `keep_first: a, keep_last: b`.
#[derive(Clone, Debug, PartialEq)]
pub struct GemFilter {
    pub filter_layer: usize,
    /// Tokens kept (at most; the whole prompt when it is shorter).
    pub keep: Option<usize>,
    /// Share of the prompt's tokens kept, rounded up.
    pub keep_fraction: Option<f64>,
    pub pool: usize,
    /// Kept tokens reserved for the prompt's first positions (0 in the reference).
    pub keep_first: usize,
    /// Kept tokens reserved for the prompt's last positions (0 in the reference).
    pub keep_last: usize,
}

impl GemFilter {
    /// A filter keeping `keep` tokens.
    pub fn new(filter_layer: usize, keep: Keep, pool: usize) -> Self {
        let (tokens, fraction) = match keep {
            Keep::Tokens(k) => (Some(k), None),
            Keep::Fraction(f) => (None, Some(f)),
        };
        GemFilter {
            filter_layer,
            keep: tokens,
            keep_fraction: fraction,
            pool,
            keep_first: 0,
            keep_last: 0,
        }
    }

    /// The same filter, always keeping the prompt's first `first` and last `last` positions.
    pub fn forcing(self, first: usize, last: usize) -> Self {
        GemFilter {
            keep_first: first,
            keep_last: last,
            ..self
        }
    }

    fn err(message: String) -> PassError {
        PassError::Config {
            pass: "GemFilter",
            message,
        }
    }

    /// What `keep` or `keep_fraction` says.
    pub fn keep(&self) -> Result<Keep, PassError> {
        match (self.keep, self.keep_fraction) {
            (Some(k), None) => Ok(Keep::Tokens(k)),
            (None, Some(f)) => Ok(Keep::Fraction(f)),
            (Some(_), Some(_)) => Err(Self::err(
                "set one of keep and keep_fraction, not both".into(),
            )),
            (None, None) => Err(Self::err(
                "set keep (tokens) or keep_fraction (a share of the prompt)".into(),
            )),
        }
    }
}

impl Pass for GemFilter {
    fn name(&self) -> &'static str {
        "GemFilter"
    }

    fn run(&self, g: &mut Graph, _cx: &PassContext) -> Result<PassReport, PassError> {
        if !g.info.family.is_decoder() {
            return Err(Self::err(format!(
                "{} is an encoder; GemFilter selects a decoder's prompt tokens",
                g.info.model_type
            )));
        }
        let keep = self.keep()?;
        let field = |field: &'static str, message: String| PassError::Field {
            pass: "GemFilter",
            field,
            message,
        };
        if let Err(message) = check_keep_and_pool(&keep, 1) {
            let name = match keep {
                Keep::Tokens(_) => "keep",
                Keep::Fraction(_) => "keep_fraction",
            };
            return Err(field(name, message));
        }
        if let Err(message) = check_keep_and_pool(&Keep::Tokens(1), self.pool) {
            return Err(field("pool", message));
        }
        if let Err(message) = check_forced(&keep, self.keep_first, self.keep_last) {
            // The field over the count on its own, else (the sum over it) keep_first: the
            // message names both numbers either way.
            let name = match keep {
                Keep::Tokens(k) if self.keep_last > k => "keep_last",
                _ => "keep_first",
            };
            return Err(field(name, message));
        }
        let layers = g.blocks.len();
        if self.filter_layer >= layers {
            return Err(field(
                "filter_layer",
                format!(
                    "filter_layer {} is out of range 0..{layers} (the 0-based index of the layer \
                     whose attention selects)",
                    self.filter_layer
                ),
            ));
        }
        if g.filter.is_some() {
            return Err(Self::err("the pipeline already has a GemFilter".into()));
        }
        if g.blocks
            .iter()
            .any(|b| b.iteration > 0 || b.weights != b.depth)
        {
            return Err(Self::err(
                "GemFilter cannot follow TieLayers (or DepthLora): its filter layer would be one \
                 iteration of a shared block; put GemFilter on the untied model"
                    .into(),
            ));
        }
        let r = self.filter_layer;
        let attention = g
            .graph
            .node_indices()
            .find(|&n| g.graph[n].layer == Some(r) && matches!(g.graph[n].op, Op::Attention(_)))
            .ok_or_else(|| Self::err(format!("layer {r} has no attention to select with")))?;
        let Op::Attention(attn) = g.graph[attention].op.clone() else {
            return Err(Self::err(format!(
                "layer {r} has no attention to select with"
            )));
        };
        let input = match g.inputs(attention).first() {
            Some(&n) if matches!(g.graph[n].op, Op::Norm(_)) => n,
            _ => {
                return Err(Self::err(format!(
                    "layer {r}'s attention does not read a norm of the residual stream \
                     (GemFilter needs a pre-norm decoder)"
                )))
            }
        };
        if g.find(SCORES).is_some() || g.outputs.contains_key(SCORES) {
            return Err(Self::err(format!(
                "the graph already has a node named {SCORES}"
            )));
        }
        let scores = g.add(
            Node {
                name: SCORES.to_string(),
                op: Op::QueryKeyScores(attn),
                layer: Some(r),
                shape: Shape::per_token(1),
            },
            &[input],
        );
        g.outputs.insert(SCORES.to_string(), scores);
        g.filter = Some(Filter {
            layer: r,
            keep,
            pool: self.pool,
            scores,
            keep_first: self.keep_first,
            keep_last: self.keep_last,
        });
        let keep = match keep {
            Keep::Tokens(k) => format!("{k} tokens"),
            Keep::Fraction(f) => format!("{:.1}% of the tokens", f * 100.0),
        };
        let forced = match (self.keep_first, self.keep_last) {
            (0, 0) => String::new(),
            (a, b) => format!(", always keeping its first {a} and last {b}"),
        };
        Ok(PassReport {
            summary: format!(
                "select the prompt's top {keep} by layer {r}'s last-query scores (pool {}){forced}; \
                 the full model runs on those",
                self.pool
            ),
            added: vec![SCORES.to_string()],
            removed: Vec::new(),
            changed: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PassManager, TieLayers, TruncateLayers};
    use proptest::prelude::*;
    use std::path::Path;

    fn fixture(name: &str) -> Graph {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name);
        exitgraph_ir::import(&dir).expect("fixture imports").graph
    }

    fn gemfilter(r: usize, keep: Keep, pool: usize) -> Box<dyn Pass> {
        Box::new(GemFilter::new(r, keep, pool))
    }

    #[test]
    fn bad_settings_name_their_field() {
        let e = |name: &str, pass: Box<dyn Pass>| {
            let mut g = fixture(name);
            PassManager::new(vec![pass])
                .run(&mut g)
                .expect_err("rejects")
                .to_string()
        };
        assert!(e("tiny-llama", gemfilter(6, Keep::Tokens(8), 5)).contains("filter_layer 6"));
        assert!(e("tiny-llama", gemfilter(2, Keep::Tokens(0), 5)).contains("keep"));
        assert!(e("tiny-llama", gemfilter(2, Keep::Fraction(2.0), 5)).contains("keep_fraction"));
        assert!(e("tiny-llama", gemfilter(2, Keep::Tokens(8), 4)).contains("pool"));
        let forced = |a, b| Box::new(GemFilter::new(1, Keep::Tokens(8), 5).forcing(a, b));
        assert!(e("tiny-llama", forced(2, 9)).contains("keep_last"));
        let e45 = e("tiny-llama", forced(4, 5));
        assert!(
            e45.contains("keep_first") && e45.contains("(4 + 5)"),
            "{e45}"
        );
        let mut g = fixture("tiny-llama");
        PassManager::new(vec![forced(3, 5) as Box<dyn Pass>])
            .run(&mut g)
            .expect("3 + 5 forced of 8 fit");
        let f = g.filter.expect("a filter record");
        assert_eq!((f.keep_first, f.keep_last), (3, 5));
        let both = GemFilter {
            keep_fraction: Some(0.5),
            ..GemFilter::new(1, Keep::Tokens(8), 5)
        };
        assert!(e("tiny-llama", Box::new(both)).contains("not both"));
        let neither = GemFilter {
            keep: None,
            ..GemFilter::new(1, Keep::Tokens(8), 5)
        };
        assert!(e("tiny-llama", Box::new(neither)).contains("keep_fraction"));
        let mut g = fixture("tiny-llama");
        let tie = TieLayers {
            loops: 2,
            init: Default::default(),
            norms: Default::default(),
            weights: None,
        };
        let e = PassManager::new(vec![Box::new(tie), gemfilter(1, Keep::Tokens(8), 5)])
            .run(&mut g)
            .expect_err("rejects")
            .to_string();
        assert!(e.contains("TieLayers"), "{e}");
        let mut g = fixture("tiny-llama");
        let e = PassManager::new(vec![
            gemfilter(1, Keep::Tokens(8), 5),
            gemfilter(2, Keep::Tokens(8), 5),
        ])
        .run(&mut g)
        .expect_err("rejects")
        .to_string();
        assert!(e.contains("already has a GemFilter"), "{e}");
    }

    #[test]
    fn truncating_away_the_filter_layer_is_an_error() {
        let mut g = fixture("tiny-llama");
        let e = PassManager::new(vec![
            gemfilter(4, Keep::Tokens(8), 5),
            Box::new(TruncateLayers { keep: 3 }),
        ])
        .run(&mut g)
        .expect_err("rejects")
        .to_string();
        assert!(e.contains("GemFilter") && e.contains("layer 4"), "{e}");
        let mut g = fixture("tiny-llama");
        PassManager::new(vec![
            gemfilter(2, Keep::Tokens(8), 5),
            Box::new(TruncateLayers { keep: 3 }),
        ])
        .run(&mut g)
        .expect("the filter layer survives");
        assert_eq!(g.filter.as_ref().map(|f| f.layer), Some(2));
    }

    proptest! {
        /// The pass adds exactly the scores node (reading the filter layer's attention input,
        /// with that attention's op) and its output; every other node, edge and output is
        /// the original's; the graph verifies.
        #[test]
        fn gemfilter_adds_only_the_scores_node(
            name in prop_oneof![Just("tiny-llama"), Just("tiny-qwen2"), Just("tiny-gpt2")],
            frac in 0.0f64..1.0,
            keep in 1usize..512,
            pool in prop_oneof![Just(1usize), Just(3), Just(5), Just(7)],
        ) {
            let g = fixture(name);
            let n = g.info.num_layers;
            let r = ((n as f64 * frac) as usize).min(n - 1);
            let mut h = g.clone();
            PassManager::new(vec![gemfilter(r, Keep::Tokens(keep), pool)])
                .run(&mut h)
                .expect("verifies");
            let f = h.filter.clone().expect("a filter record");
            prop_assert_eq!((f.layer, f.keep, f.pool), (r, Keep::Tokens(keep), pool));
            prop_assert_eq!((f.keep_first, f.keep_last), (0, 0));
            prop_assert_eq!(h.graph.node_count(), g.graph.node_count() + 1);
            prop_assert_eq!(h.graph.edge_count(), g.graph.edge_count() + 1);
            for idx in g.graph.node_indices() {
                prop_assert_eq!(&g.graph[idx].name, &h.graph[idx].name);
                prop_assert_eq!(&g.graph[idx].op, &h.graph[idx].op);
                prop_assert_eq!(g.inputs(idx), h.inputs(idx));
            }
            let mut outputs = h.outputs.clone();
            prop_assert_eq!(outputs.remove(SCORES), Some(f.scores));
            prop_assert_eq!(outputs, g.outputs.clone());
            let attention = g
                .graph
                .node_indices()
                .find(|&i| g.graph[i].layer == Some(r) && matches!(g.graph[i].op, Op::Attention(_)))
                .expect("an attention");
            prop_assert_eq!(h.inputs(f.scores), g.inputs(attention));
            let scores_op = match &g.graph[attention].op {
                Op::Attention(a) => Op::QueryKeyScores(a.clone()),
                other => other.clone(),
            };
            prop_assert_eq!(&h.graph[f.scores].op, &scores_op);
        }
    }
}
