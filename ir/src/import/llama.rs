//! Llama, Mistral and Qwen2: pre-norm decoders with RMSNorm, rotary attention (GQA) and a
//! SwiGLU MLP. They differ in biases, sliding windows and defaults.

use super::config::JsonConfig;
use super::context::{add_input, add_node, Ctx};
use super::error::ImportError;
use super::rope::rope_from_config;
use crate::graph::{Family, Graph, ModelInfo};
use crate::op::{Activation, Attention, Embedding, Mlp, Norm, NormKind, Op};
use crate::weight::WeightCatalog;

pub(super) fn activation(
    cfg: &JsonConfig,
    field: &str,
    default: &str,
) -> Result<Activation, ImportError> {
    let name = cfg.opt_str(field)?.unwrap_or(default);
    Ok(match name {
        "silu" | "swish" => Activation::Silu,
        "gelu" => Activation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
        "relu" => Activation::Relu,
        "quick_gelu" => Activation::QuickGelu,
        other => {
            return Err(cfg.error(
                field,
                format!("activation \"{other}\" is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh, relu, quick_gelu)"),
            ))
        }
    })
}

/// Which layers use a sliding window, and its size.
fn sliding_windows(
    cfg: &JsonConfig,
    family: Family,
    layers: usize,
) -> Result<Vec<Option<usize>>, ImportError> {
    let window = match family {
        // MistralConfig defaults to 4096 when the key is absent; `null` disables it.
        Family::Mistral if cfg.value.get("sliding_window").is_none() => Some(4096),
        _ => cfg.opt_usize("sliding_window")?,
    };
    if window == Some(0) {
        return Err(cfg.error("sliding_window", "must be at least 1"));
    }
    if let Some(types) = cfg.opt_str_list("layer_types")? {
        if types.len() != layers {
            return Err(cfg.error(
                "layer_types",
                format!("has {} entries, num_hidden_layers is {layers}", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => window.map(Some).ok_or_else(|| {
                    cfg.error(
                        "sliding_window",
                        "missing, but layer_types asks for sliding_attention",
                    )
                }),
                other => Err(cfg.error("layer_types", format!("unknown layer type \"{other}\""))),
            })
            .collect();
    }
    Ok(match family {
        Family::Qwen2 => {
            let use_sw = cfg.opt_bool("use_sliding_window")?.unwrap_or(false);
            let from = cfg.opt_usize("max_window_layers")?.unwrap_or(28);
            (0..layers)
                .map(|i| if use_sw && i >= from { window } else { None })
                .collect()
        }
        Family::Mistral => vec![window; layers],
        _ => vec![None; layers],
    })
}

pub(super) fn build(
    cfg: &JsonConfig,
    catalog: &WeightCatalog,
    family: Family,
    model_type: &str,
) -> Result<Graph, ImportError> {
    let hidden = cfg.positive("hidden_size")?;
    let layers = cfg.positive("num_hidden_layers")?;
    let heads = cfg.positive("num_attention_heads")?;
    let kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(cfg.error(
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads ({heads})"),
        ));
    }
    let head_dim = match cfg.opt_usize("head_dim")? {
        Some(d) if d > 0 => d,
        Some(_) => return Err(cfg.error("head_dim", "must be at least 1")),
        None => {
            if hidden % heads != 0 {
                return Err(cfg.error(
                    "hidden_size",
                    format!("{hidden} is not divisible by num_attention_heads ({heads}) and head_dim is not given"),
                ));
            }
            hidden / heads
        }
    };
    let intermediate = cfg.positive("intermediate_size")?;
    let vocab = cfg.positive("vocab_size")?;
    let eps = cfg.positive_f64("rms_norm_eps", 1e-6)?;
    let act = activation(cfg, "hidden_act", "silu")?;
    let (qkv_bias, o_bias) = match family {
        Family::Qwen2 => (true, false),
        Family::Mistral => (false, false),
        _ => {
            let b = cfg.opt_bool("attention_bias")?.unwrap_or(false);
            (b, b)
        }
    };
    let mlp_bias = cfg.opt_bool("mlp_bias")?.unwrap_or(false);
    let rope = rope_from_config(cfg, head_dim, 10000.0)?;
    let ctx = Ctx::new(cfg, catalog, &["model.", ""], "embed_tokens.weight");
    let last = format!("{}layers.{}.", ctx.prefix, layers - 1);
    if !catalog.tensors.keys().any(|k| k.starts_with(&last)) {
        return Err(cfg.error(
            "num_hidden_layers",
            format!(
                "is {layers}, but {} has no tensors of layer {} ({last}*)",
                ctx.weights_path.display(),
                layers - 1
            ),
        ));
    }
    let windows = sliding_windows(cfg, family, layers)?;
    let tie = cfg.opt_bool("tie_word_embeddings")?.unwrap_or(false);
    let default_max = match family {
        Family::Qwen2 => 32768,
        Family::Mistral => 131072,
        _ => 2048,
    };
    let info = ModelInfo {
        family,
        model_type: model_type.to_string(),
        num_layers: layers,
        hidden,
        vocab,
        max_positions: cfg
            .opt_usize("max_position_embeddings")?
            .unwrap_or(default_max),
        bos_token_id: cfg.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: cfg.token_ids("eos_token_id")?,
        pad_token_id: cfg.token_ids("pad_token_id")?.first().copied(),
    };

    let mut g = Graph::new(info, catalog.clone());
    let input = add_input(&mut g);
    let embed_w = ctx.tensor("embed_tokens.weight", "embedding")?;
    let embed = add_node(
        &mut g,
        "embed",
        Op::Embedding(Embedding {
            vocab,
            hidden,
            tokens: embed_w.clone(),
            positions: None,
            token_types: None,
        }),
        None,
        hidden,
        &[input],
    );
    g.outputs.insert("hidden_states.0".into(), embed);
    let rms = |w| {
        Op::Norm(Norm {
            kind: NormKind::Rms,
            hidden,
            eps,
            weight: w,
            bias: None,
        })
    };
    let mut x = embed;
    let mut block_outputs = Vec::with_capacity(layers);
    for (i, &window) in windows.iter().enumerate() {
        let p = format!("layers.{i}");
        let ln1 = add_node(
            &mut g,
            format!("{p}.attn_norm"),
            rms(ctx.tensor(
                &format!("{p}.input_layernorm.weight"),
                &format!("{p}.attn_norm"),
            )?),
            Some(i),
            hidden,
            &[x],
        );
        let a = format!("{p}.self_attn");
        let need = format!("{p}.attn");
        let attn = Attention {
            heads,
            kv_heads,
            head_dim,
            q: ctx.linear(
                &format!("{a}.q_proj"),
                hidden,
                heads * head_dim,
                qkv_bias,
                &need,
            )?,
            k: ctx.linear(
                &format!("{a}.k_proj"),
                hidden,
                kv_heads * head_dim,
                qkv_bias,
                &need,
            )?,
            v: ctx.linear(
                &format!("{a}.v_proj"),
                hidden,
                kv_heads * head_dim,
                qkv_bias,
                &need,
            )?,
            o: ctx.linear(
                &format!("{a}.o_proj"),
                heads * head_dim,
                hidden,
                o_bias,
                &need,
            )?,
            rope: Some(rope.clone()),
            causal: true,
            sliding_window: window,
            scale: 1.0 / (head_dim as f64).sqrt(),
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
            format!("{p}.attn_residual"),
            Op::Add,
            Some(i),
            hidden,
            &[x, attn],
        );
        let ln2 = add_node(
            &mut g,
            format!("{p}.mlp_norm"),
            rms(ctx.tensor(
                &format!("{p}.post_attention_layernorm.weight"),
                &format!("{p}.mlp_norm"),
            )?),
            Some(i),
            hidden,
            &[res1],
        );
        let m = format!("{p}.mlp");
        let mlp = Mlp {
            act,
            gate: Some(ctx.linear(
                &format!("{m}.gate_proj"),
                hidden,
                intermediate,
                mlp_bias,
                &m,
            )?),
            up: ctx.linear(&format!("{m}.up_proj"), hidden, intermediate, mlp_bias, &m)?,
            down: ctx.linear(
                &format!("{m}.down_proj"),
                intermediate,
                hidden,
                mlp_bias,
                &m,
            )?,
        };
        let mlp = add_node(&mut g, m.clone(), Op::Mlp(mlp), Some(i), hidden, &[ln2]);
        x = add_node(
            &mut g,
            format!("{p}.mlp_residual"),
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
        rms(ctx.tensor("norm.weight", "final_norm")?),
        None,
        hidden,
        &[x],
    );
    g.outputs.insert(format!("hidden_states.{layers}"), norm);
    let head_w = if tie {
        embed_w
    } else {
        ctx.exact("lm_head.weight", "lm_head (tie_word_embeddings is false)")?
    };
    let head = add_node(
        &mut g,
        "lm_head",
        Op::LmHead(crate::op::Linear {
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
