//! Small graphs for unit tests: a hand-made Llama-shaped chain of `layers` blocks, and graphs
//! tied into a loop by the real `TieLayers` / `DepthLora` passes.

use exitgraph_ir::op::{Embedding, Norm, NormKind};
use exitgraph_ir::{Family, Graph, ModelInfo, Node, Op, Shape, WeightCatalog, WeightRef};

fn norm(name: &str) -> Op {
    Op::Norm(Norm {
        kind: NormKind::Rms,
        hidden: 8,
        eps: 1e-5,
        weight: WeightRef::file(format!("{name}.weight")),
        bias: None,
    })
}

fn node(name: &str, op: Op, layer: Option<usize>) -> Node {
    Node {
        name: name.to_string(),
        op,
        layer,
        shape: Shape::per_token(8),
    }
}

/// input → embed → `layers` × (norm, "attn", add, norm, "mlp", add) → norm → lm_head.
/// Attention and MLP are stood in for by norms: tests here look at structure, not maths.
pub fn chain(layers: usize) -> Graph {
    let info = ModelInfo {
        family: Family::Llama,
        model_type: "llama".into(),
        num_layers: layers,
        hidden: 8,
        vocab: 16,
        max_positions: 64,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: None,
    };
    let mut g = Graph::new(info, WeightCatalog::default());
    let input = g.add(
        Node {
            name: "input_ids".into(),
            op: Op::TokenInput,
            layer: None,
            shape: Shape::tokens(),
        },
        &[],
    );
    let embed = Embedding {
        vocab: 16,
        hidden: 8,
        tokens: WeightRef::file("embed.weight"),
        positions: None,
        token_types: None,
    };
    let mut x = g.add(node("embed", Op::Embedding(embed), None), &[input]);
    let embedded = x;
    let mut block_outputs = Vec::new();
    g.outputs.insert("hidden_states.0".into(), x);
    for l in 0..layers {
        let p = format!("layers.{l}");
        let n1 = g.add(node(&format!("{p}.input_norm"), norm(&p), Some(l)), &[x]);
        let attn = g.add(node(&format!("{p}.attn"), norm(&p), Some(l)), &[n1]);
        let a1 = g.add(
            node(&format!("{p}.attn_residual"), Op::Add, Some(l)),
            &[x, attn],
        );
        let n2 = g.add(node(&format!("{p}.post_norm"), norm(&p), Some(l)), &[a1]);
        let mlp = g.add(node(&format!("{p}.mlp"), norm(&p), Some(l)), &[n2]);
        x = g.add(
            node(&format!("{p}.mlp_residual"), Op::Add, Some(l)),
            &[a1, mlp],
        );
        g.outputs.insert(format!("hidden_states.{}", l + 1), x);
        block_outputs.push(x);
    }
    g.set_untied_blocks(embedded, &block_outputs);
    let n = g.add(node("norm", norm("norm"), None), &[x]);
    let head = g.add(node("lm_head", norm("lm_head"), None), &[n]);
    g.outputs.insert("logits".into(), head);
    g.head.norm = Some(n);
    g.head.logits = Some(head);
    g
}

/// Imported graph `g` after the real `TieLayers(loops, init: Average)` pass and, with a
/// `rank`, the real `DepthLora(rank: Rank(rank), init: Svd)` on every projection. The passes
/// only write recipes (no tensor is read), so this is quick; the pass manager verifies the
/// result against the checkpoint's catalog, which [`chain`] does not have.
fn tie(mut g: Graph, loops: usize, rank: Option<usize>) -> Graph {
    use exitgraph::passes::{
        DepthLora, LoraInit, LoraRank, LoraTarget, Pass, PassManager, TieInit, TieLayers, TieNorms,
    };
    let mut passes: Vec<Box<dyn Pass>> = vec![Box::new(TieLayers {
        loops,
        init: TieInit::Average,
        norms: TieNorms::Shared,
        weights: None,
    })];
    if let Some(r) = rank {
        use LoraTarget::*;
        passes.push(Box::new(DepthLora {
            rank: LoraRank::Rank(r),
            targets: vec![q, k, v, o, gate, up, down],
            init: LoraInit::Svd,
            weights: None,
        }));
    }
    PassManager::new(passes)
        .run(&mut g)
        .expect("the passes apply");
    g
}

/// The demo model (8 layers) tied into a block looped `loops` times, with rank-`rank`
/// adapters per iteration when given.
pub fn tied_demo(loops: usize, rank: Option<usize>) -> Graph {
    let ckpt =
        exitgraph_ir::import(&exitgraph::pipeline::demo_model_dir()).expect("the demo model");
    tie(ckpt.graph, loops, rank)
}
