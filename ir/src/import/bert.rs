//! BERT encoders (MiniLM): word + position + token-type embeddings with LayerNorm, post-norm
//! blocks, exact GELU. A sentence-transformers folder (`modules.json`, `1_Pooling/`) adds the
//! pooled, optionally normalised `sentence_embedding` output.

use super::config::JsonConfig;
use super::context::{add_input, add_node, Ctx};
use super::error::ImportError;
use super::llama::activation;
use crate::graph::{Family, Graph, ModelInfo, Node};
use crate::op::{Attention, Embedding, Mlp, Norm, NormKind, Op, Pool, PoolMode};
use crate::shape::Shape;
use crate::weight::WeightCatalog;
use std::path::Path;

pub(super) fn build(
    cfg: &JsonConfig,
    catalog: &WeightCatalog,
    dir: &Path,
) -> Result<Graph, ImportError> {
    let hidden = cfg.positive("hidden_size")?;
    let layers = cfg.positive("num_hidden_layers")?;
    let heads = cfg.positive("num_attention_heads")?;
    if hidden % heads != 0 {
        return Err(cfg.error(
            "hidden_size",
            format!("{hidden} is not divisible by num_attention_heads ({heads})"),
        ));
    }
    let head_dim = hidden / heads;
    let intermediate = cfg.positive("intermediate_size")?;
    let vocab = cfg.positive("vocab_size")?;
    let eps = cfg.positive_f64("layer_norm_eps", 1e-12)?;
    let act = activation(cfg, "hidden_act", "gelu")?;
    if let Some(kind) = cfg.opt_str("position_embedding_type")? {
        if kind != "absolute" {
            return Err(cfg.error(
                "position_embedding_type",
                format!("\"{kind}\" is not supported (supported: absolute)"),
            ));
        }
    }
    let info = ModelInfo {
        family: Family::Bert,
        model_type: "bert".into(),
        num_layers: layers,
        hidden,
        vocab,
        max_positions: cfg.opt_usize("max_position_embeddings")?.unwrap_or(512),
        bos_token_id: None,
        eos_token_ids: Vec::new(),
        pad_token_id: cfg.token_ids("pad_token_id")?.first().copied(),
    };
    let ctx = Ctx::new(
        cfg,
        catalog,
        &["bert.", ""],
        "embeddings.word_embeddings.weight",
    );
    let mut g = Graph::new(info, catalog.clone());
    let input = add_input(&mut g);
    let ln = |ctx: &Ctx, base: &str, need: &str| -> Result<Op, ImportError> {
        Ok(Op::Norm(Norm {
            kind: NormKind::Layer,
            hidden,
            eps,
            weight: ctx.tensor(&format!("{base}.weight"), need)?,
            bias: Some(ctx.tensor(&format!("{base}.bias"), need)?),
        }))
    };
    let embed = add_node(
        &mut g,
        "embed",
        Op::Embedding(Embedding {
            vocab,
            hidden,
            tokens: ctx.tensor("embeddings.word_embeddings.weight", "embedding")?,
            positions: Some(ctx.tensor("embeddings.position_embeddings.weight", "embedding")?),
            token_types: Some(ctx.tensor("embeddings.token_type_embeddings.weight", "embedding")?),
        }),
        None,
        hidden,
        &[input],
    );
    let embed_norm = add_node(
        &mut g,
        "embed_norm",
        ln(&ctx, "embeddings.LayerNorm", "embed_norm")?,
        None,
        hidden,
        &[embed],
    );
    g.outputs.insert("hidden_states.0".into(), embed_norm);
    let mut x = embed_norm;
    let mut block_outputs = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        let n = format!("layers.{i}");
        let need = format!("{n}.attn");
        let attn = Attention {
            heads,
            kv_heads: heads,
            head_dim,
            q: ctx.linear(
                &format!("{p}.attention.self.query"),
                hidden,
                hidden,
                true,
                &need,
            )?,
            k: ctx.linear(
                &format!("{p}.attention.self.key"),
                hidden,
                hidden,
                true,
                &need,
            )?,
            v: ctx.linear(
                &format!("{p}.attention.self.value"),
                hidden,
                hidden,
                true,
                &need,
            )?,
            o: ctx.linear(
                &format!("{p}.attention.output.dense"),
                hidden,
                hidden,
                true,
                &need,
            )?,
            rope: None,
            causal: false,
            sliding_window: None,
            scale: 1.0 / (head_dim as f64).sqrt(),
        };
        let attn = add_node(
            &mut g,
            need.clone(),
            Op::Attention(attn),
            Some(i),
            hidden,
            &[x],
        );
        let res1 = add_node(
            &mut g,
            format!("{n}.attn_residual"),
            Op::Add,
            Some(i),
            hidden,
            &[x, attn],
        );
        let ln1 = add_node(
            &mut g,
            format!("{n}.attn_norm"),
            ln(
                &ctx,
                &format!("{p}.attention.output.LayerNorm"),
                &format!("{n}.attn_norm"),
            )?,
            Some(i),
            hidden,
            &[res1],
        );
        let m = format!("{n}.mlp");
        let mlp = Mlp {
            act,
            gate: None,
            up: ctx.linear(
                &format!("{p}.intermediate.dense"),
                hidden,
                intermediate,
                true,
                &m,
            )?,
            down: ctx.linear(&format!("{p}.output.dense"), intermediate, hidden, true, &m)?,
        };
        let mlp = add_node(&mut g, m.clone(), Op::Mlp(mlp), Some(i), hidden, &[ln1]);
        let res2 = add_node(
            &mut g,
            format!("{n}.mlp_residual"),
            Op::Add,
            Some(i),
            hidden,
            &[ln1, mlp],
        );
        x = add_node(
            &mut g,
            format!("{n}.mlp_norm"),
            ln(
                &ctx,
                &format!("{p}.output.LayerNorm"),
                &format!("{n}.mlp_norm"),
            )?,
            Some(i),
            hidden,
            &[res2],
        );
        g.outputs.insert(format!("hidden_states.{}", i + 1), x);
        block_outputs.push(x);
    }
    g.set_untied_blocks(embed_norm, &block_outputs);
    g.outputs.insert("last_hidden_state".into(), x);
    if let Some(pool) = sentence_pooling(dir, hidden)? {
        let idx = g.add(
            Node {
                name: "pool".into(),
                op: Op::Pool(pool),
                layer: None,
                shape: Shape::per_sequence(hidden),
            },
            &[x],
        );
        g.outputs.insert("sentence_embedding".into(), idx);
        g.head.pooled = Some(idx);
    }
    Ok(g)
}

/// Pooling of a sentence-transformers folder, if `modules.json` declares one.
fn sentence_pooling(dir: &Path, hidden: usize) -> Result<Option<Pool>, ImportError> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&modules_path).map_err(|e| ImportError::io(&modules_path, e))?;
    let modules: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ImportError::json(&modules_path, &e))?;
    let list = modules.as_array().ok_or_else(|| ImportError::Field {
        path: modules_path.clone(),
        field: "(top level)".into(),
        problem: "expected a list of modules".into(),
    })?;
    let kind_of = |m: &serde_json::Value| {
        m.get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string()
    };
    let Some(pool_module) = list.iter().find(|m| kind_of(m).ends_with(".Pooling")) else {
        return Ok(None);
    };
    let normalize = list.iter().any(|m| kind_of(m).ends_with(".Normalize"));
    let pool_dir = pool_module
        .get("path")
        .and_then(|p| p.as_str())
        .unwrap_or("1_Pooling");
    let pool_cfg = JsonConfig::read(&dir.join(pool_dir).join("config.json"))?;
    let mean = pool_cfg
        .opt_bool("pooling_mode_mean_tokens")?
        .unwrap_or(false);
    let cls = pool_cfg
        .opt_bool("pooling_mode_cls_token")?
        .unwrap_or(false);
    for unsupported in [
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ] {
        if pool_cfg.opt_bool(unsupported)?.unwrap_or(false) {
            return Err(pool_cfg.error(
                unsupported,
                "this pooling mode is not supported (supported: mean, cls)",
            ));
        }
    }
    let mode = match (mean, cls) {
        (true, false) => PoolMode::Mean,
        (false, true) => PoolMode::Cls,
        _ => {
            return Err(pool_cfg.error(
                "pooling_mode_mean_tokens",
                "exactly one of mean or cls pooling must be enabled",
            ))
        }
    };
    if let Some(dim) = pool_cfg.opt_usize("word_embedding_dimension")? {
        if dim != hidden {
            return Err(pool_cfg.error(
                "word_embedding_dimension",
                format!("{dim} differs from hidden_size {hidden}"),
            ));
        }
    }
    Ok(Some(Pool {
        hidden,
        mode,
        normalize,
    }))
}
