//! GPT-2: learned positions, pre-norm LayerNorm blocks, fused `c_attn` stored as `Conv1D`
//! (`[in, out]`), GELU MLP, and an LM head tied to the token embedding.

use super::config::JsonConfig;
use super::context::{add_input, add_node, Ctx};
use super::error::ImportError;
use super::llama::activation;
use crate::graph::{Family, Graph, ModelInfo};
use crate::op::{Attention, Embedding, Linear, Mlp, Norm, NormKind, Op};
use crate::weight::{WeightCatalog, WeightRef};

/// A `Conv1D` layer as a [`Linear`]: the stored `[in, out]` weight, transposed.
fn conv1d(
    ctx: &Ctx,
    base: &str,
    in_f: usize,
    out_f: usize,
    need: &str,
) -> Result<Linear, ImportError> {
    Ok(Linear {
        weight: ctx.tensor(&format!("{base}.weight"), need)?.transposed(),
        bias: Some(ctx.tensor(&format!("{base}.bias"), need)?),
        in_features: in_f,
        out_features: out_f,
        adapter: None,
    })
}

/// Part `part` (0 = q, 1 = k, 2 = v) of the fused `c_attn`.
fn qkv_part(fused: &Linear, part: usize, hidden: usize) -> Linear {
    let slice = |w: &WeightRef| w.clone().slice(0, part * hidden, hidden);
    Linear {
        weight: slice(&fused.weight),
        bias: fused.bias.as_ref().map(slice),
        in_features: hidden,
        out_features: hidden,
        adapter: None,
    }
}

pub(super) fn build(cfg: &JsonConfig, catalog: &WeightCatalog) -> Result<Graph, ImportError> {
    let hidden = cfg.positive("n_embd")?;
    let layers = cfg.positive("n_layer")?;
    let heads = cfg.positive("n_head")?;
    if hidden % heads != 0 {
        return Err(cfg.error(
            "n_embd",
            format!("{hidden} is not divisible by n_head ({heads})"),
        ));
    }
    let head_dim = hidden / heads;
    let inner = cfg.opt_usize("n_inner")?.unwrap_or(4 * hidden);
    let vocab = cfg.positive("vocab_size")?;
    let max_positions = cfg.positive("n_positions")?;
    let eps = cfg.positive_f64("layer_norm_epsilon", 1e-5)?;
    let act = activation(cfg, "activation_function", "gelu_new")?;
    let scale_weights = cfg.opt_bool("scale_attn_weights")?.unwrap_or(true);
    let by_layer = cfg
        .opt_bool("scale_attn_by_inverse_layer_idx")?
        .unwrap_or(false);
    let tie = cfg.opt_bool("tie_word_embeddings")?.unwrap_or(true);
    let info = ModelInfo {
        family: Family::Gpt2,
        model_type: "gpt2".into(),
        num_layers: layers,
        hidden,
        vocab,
        max_positions,
        bos_token_id: cfg.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: cfg.token_ids("eos_token_id")?,
        pad_token_id: cfg.token_ids("pad_token_id")?.first().copied(),
    };
    let ctx = Ctx::new(cfg, catalog, &["transformer.", ""], "wte.weight");
    let mut g = Graph::new(info, catalog.clone());
    let input = add_input(&mut g);
    let wte = ctx.tensor("wte.weight", "embedding")?;
    let embed = add_node(
        &mut g,
        "embed",
        Op::Embedding(Embedding {
            vocab,
            hidden,
            tokens: wte.clone(),
            positions: Some(ctx.tensor("wpe.weight", "embedding")?),
            token_types: None,
        }),
        None,
        hidden,
        &[input],
    );
    g.outputs.insert("hidden_states.0".into(), embed);
    let ln = |ctx: &Ctx, base: &str, need: &str| -> Result<Op, ImportError> {
        Ok(Op::Norm(Norm {
            kind: NormKind::Layer,
            hidden,
            eps,
            weight: ctx.tensor(&format!("{base}.weight"), need)?,
            bias: Some(ctx.tensor(&format!("{base}.bias"), need)?),
        }))
    };
    let mut x = embed;
    let mut block_outputs = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("h.{i}");
        let n = format!("layers.{i}");
        let ln1 = add_node(
            &mut g,
            format!("{n}.attn_norm"),
            ln(&ctx, &format!("{p}.ln_1"), &format!("{n}.attn_norm"))?,
            Some(i),
            hidden,
            &[x],
        );
        let need = format!("{n}.attn");
        let fused = conv1d(&ctx, &format!("{p}.attn.c_attn"), hidden, 3 * hidden, &need)?;
        let mut scale = if scale_weights {
            1.0 / (head_dim as f64).sqrt()
        } else {
            1.0
        };
        if by_layer {
            scale /= (i + 1) as f64;
        }
        let attn = Attention {
            heads,
            kv_heads: heads,
            head_dim,
            q: qkv_part(&fused, 0, hidden),
            k: qkv_part(&fused, 1, hidden),
            v: qkv_part(&fused, 2, hidden),
            o: conv1d(&ctx, &format!("{p}.attn.c_proj"), hidden, hidden, &need)?,
            rope: None,
            causal: true,
            sliding_window: None,
            scale,
        };
        let attn = add_node(
            &mut g,
            need.clone(),
            Op::Attention(attn),
            Some(i),
            hidden,
            &[ln1],
        );
        let res1 = add_node(
            &mut g,
            format!("{n}.attn_residual"),
            Op::Add,
            Some(i),
            hidden,
            &[x, attn],
        );
        let ln2 = add_node(
            &mut g,
            format!("{n}.mlp_norm"),
            ln(&ctx, &format!("{p}.ln_2"), &format!("{n}.mlp_norm"))?,
            Some(i),
            hidden,
            &[res1],
        );
        let m = format!("{n}.mlp");
        let mlp = Mlp {
            act,
            gate: None,
            up: conv1d(&ctx, &format!("{p}.mlp.c_fc"), hidden, inner, &m)?,
            down: conv1d(&ctx, &format!("{p}.mlp.c_proj"), inner, hidden, &m)?,
        };
        let mlp = add_node(&mut g, m.clone(), Op::Mlp(mlp), Some(i), hidden, &[ln2]);
        x = add_node(
            &mut g,
            format!("{n}.mlp_residual"),
            Op::Add,
            Some(i),
            hidden,
            &[res1, mlp],
        );
        if i + 1 < layers {
            g.outputs.insert(format!("hidden_states.{}", i + 1), x);
        }
        block_outputs.push(x);
    }
    g.set_untied_blocks(embed, &block_outputs);
    let norm = add_node(
        &mut g,
        "final_norm",
        ln(&ctx, "ln_f", "final_norm")?,
        None,
        hidden,
        &[x],
    );
    g.outputs.insert(format!("hidden_states.{layers}"), norm);
    let head_w = if tie {
        wte
    } else {
        ctx.exact("lm_head.weight", "lm_head (tie_word_embeddings is false)")?
    };
    let head = add_node(
        &mut g,
        "lm_head",
        Op::LmHead(Linear {
            weight: head_w,
            bias: None,
            in_features: hidden,
            out_features: vocab,
            adapter: None,
        }),
        None,
        vocab,
        &[norm],
    );
    g.outputs.insert("logits".into(), head);
    g.head = crate::Head {
        norm: Some(norm),
        logits: Some(head),
        pooled: None,
    };
    Ok(g)
}
