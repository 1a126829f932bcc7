//! Random checkpoints in Hugging Face layout, for benchmarks and property tests.
//!
//! Weights are drawn from a seeded normal distribution (SplitMix64 + Box-Muller), so the
//! same spec and seed always give the same files.

use candle_core::{Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Shape of a random Llama-family decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaSpec {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    pub rope_theta: f64,
    /// Standard deviation of the weights.
    pub init_std: f32,
    /// Attention window of every layer (Mistral only).
    pub sliding_window: Option<usize>,
    /// Spread of the norm weights around 1 (0 for a training initialisation).
    pub norm_std: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl LlamaSpec {
    /// A Llama of about 100M parameters (12 layers, hidden 768, vocabulary 8192).
    pub fn bench_100m() -> Self {
        LlamaSpec {
            model_type: "llama".into(),
            hidden: 768,
            layers: 12,
            heads: 12,
            kv_heads: 12,
            intermediate: 2048,
            vocab: 8192,
            max_positions: 2048,
            tie_embeddings: false,
            rope_theta: 10000.0,
            init_std: 0.02,
            sliding_window: None,
            norm_std: 0.1,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// A tiny Llama for tests.
    pub fn tiny() -> Self {
        LlamaSpec {
            model_type: "llama".into(),
            hidden: 32,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            vocab: 97,
            max_positions: 256,
            tie_embeddings: false,
            rope_theta: 10000.0,
            init_std: 0.2,
            sliding_window: None,
            norm_std: 0.1,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// A seeded source of normal samples.
pub struct Normal {
    state: u64,
    spare: Option<f32>,
}

impl Normal {
    pub fn new(seed: u64) -> Self {
        Normal {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn sample(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * v;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }

    /// A `[rows, cols]` (or `[rows]` when `cols` is 0) tensor of samples times `std`.
    pub fn tensor(&mut self, dims: &[usize], std: f32) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.sample() * std).collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }
}

/// Writes `config.json` and `model.safetensors` of a random decoder into `dir`.
pub fn write_random_llama(dir: &Path, spec: &LlamaSpec, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Normal::new(seed);
    let (h, d) = (spec.hidden, spec.head_dim());
    let std = spec.init_std;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".into(),
        rng.tensor(&[spec.vocab, h], std)?,
    );
    let qwen = spec.model_type == "qwen2";
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let ones = |n| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
        // Norm weights near one, so the random model is not degenerate.
        t.insert(
            format!("{p}.input_layernorm.weight"),
            (ones(h)? + rng.tensor(&[h], spec.norm_std)?)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (ones(h)? + rng.tensor(&[h], spec.norm_std)?)?,
        );
        for (name, out) in [
            ("q_proj", spec.heads * d),
            ("k_proj", spec.kv_heads * d),
            ("v_proj", spec.kv_heads * d),
        ] {
            t.insert(
                format!("{p}.self_attn.{name}.weight"),
                rng.tensor(&[out, h], std)?,
            );
            if qwen {
                t.insert(
                    format!("{p}.self_attn.{name}.bias"),
                    rng.tensor(&[out], std)?,
                );
            }
        }
        t.insert(
            format!("{p}.self_attn.o_proj.weight"),
            rng.tensor(&[h, spec.heads * d], std)?,
        );
        t.insert(
            format!("{p}.mlp.gate_proj.weight"),
            rng.tensor(&[spec.intermediate, h], std)?,
        );
        t.insert(
            format!("{p}.mlp.up_proj.weight"),
            rng.tensor(&[spec.intermediate, h], std)?,
        );
        t.insert(
            format!("{p}.mlp.down_proj.weight"),
            rng.tensor(&[h, spec.intermediate], std)?,
        );
    }
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?,
    );
    if !spec.tie_embeddings {
        t.insert("lm_head.weight".into(), rng.tensor(&[spec.vocab, h], std)?);
    }
    let config = json!({
        "architectures": [match spec.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        }],
        "model_type": spec.model_type,
        "hidden_size": h,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_embeddings,
        "sliding_window": spec.sliding_window,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "float32",
    });
    // Never truncate a checkpoint in place: a process may have it memory-mapped.
    crate::atomic::write_text(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(&config)?,
    )?;
    crate::tensor_io::write_atomic(&dir.join("model.safetensors"), &t)?;
    Ok(())
}

/// Sizes of a random GPT-2 or BERT checkpoint ([`write_random_gpt2`], [`write_random_bert`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// GPT-2: the LM head is the token embedding.
    pub tie_embeddings: bool,
    pub init_std: f32,
}

impl BlockSpec {
    /// A tiny model for tests.
    pub fn tiny() -> Self {
        BlockSpec {
            hidden: 32,
            layers: 2,
            heads: 4,
            intermediate: 64,
            vocab: 97,
            max_positions: 64,
            tie_embeddings: true,
            init_std: 0.2,
        }
    }
}

/// A layer norm's weight (near one) and bias.
fn layer_norm(
    t: &mut HashMap<String, Tensor>,
    rng: &mut Normal,
    name: &str,
    h: usize,
) -> anyhow::Result<()> {
    let ones = Tensor::ones(h, candle_core::DType::F32, &Device::Cpu)?;
    t.insert(format!("{name}.weight"), (ones + rng.tensor(&[h], 0.1)?)?);
    t.insert(format!("{name}.bias"), rng.tensor(&[h], 0.1)?);
    Ok(())
}

/// A linear layer stored as `[out, in]` (`conv1d`: GPT-2's `[in, out]`) with a bias.
fn linear(
    t: &mut HashMap<String, Tensor>,
    rng: &mut Normal,
    name: &str,
    (inp, out): (usize, usize),
    conv1d: bool,
    std: f32,
) -> anyhow::Result<()> {
    let dims = if conv1d { [inp, out] } else { [out, inp] };
    t.insert(format!("{name}.weight"), rng.tensor(&dims, std)?);
    t.insert(format!("{name}.bias"), rng.tensor(&[out], std)?);
    Ok(())
}

fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    t: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    crate::atomic::write_text(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(config)?,
    )?;
    crate::tensor_io::write_atomic(&dir.join("model.safetensors"), t)?;
    Ok(())
}

/// Writes `config.json` and `model.safetensors` of a random GPT-2 into `dir` (tensor names
/// and `Conv1D` layouts as transformers' `GPT2LMHeadModel` saves them).
pub fn write_random_gpt2(dir: &Path, spec: &BlockSpec, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Normal::new(seed);
    let (h, std) = (spec.hidden, spec.init_std);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "transformer.wte.weight".into(),
        rng.tensor(&[spec.vocab, h], std)?,
    );
    t.insert(
        "transformer.wpe.weight".into(),
        rng.tensor(&[spec.max_positions, h], std)?,
    );
    for i in 0..spec.layers {
        let p = format!("transformer.h.{i}");
        layer_norm(&mut t, &mut rng, &format!("{p}.ln_1"), h)?;
        layer_norm(&mut t, &mut rng, &format!("{p}.ln_2"), h)?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.attn.c_attn"),
            (h, 3 * h),
            true,
            std,
        )?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.attn.c_proj"),
            (h, h),
            true,
            std,
        )?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.mlp.c_fc"),
            (h, spec.intermediate),
            true,
            std,
        )?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.mlp.c_proj"),
            (spec.intermediate, h),
            true,
            std,
        )?;
    }
    layer_norm(&mut t, &mut rng, "transformer.ln_f", h)?;
    if !spec.tie_embeddings {
        t.insert("lm_head.weight".into(), rng.tensor(&[spec.vocab, h], std)?);
    }
    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": h,
        "n_layer": spec.layers,
        "n_head": spec.heads,
        "n_inner": spec.intermediate,
        "n_positions": spec.max_positions,
        "vocab_size": spec.vocab,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": "float32",
    });
    write_checkpoint(dir, &config, &t)
}

/// Writes a random BERT sentence encoder into `dir`: `config.json`, `model.safetensors`
/// and sentence-transformers' mean pooling (`modules.json`, `1_Pooling/config.json`), as
/// MiniLM ships.
pub fn write_random_bert(dir: &Path, spec: &BlockSpec, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("1_Pooling"))?;
    let mut rng = Normal::new(seed);
    let (h, std) = (spec.hidden, spec.init_std);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "embeddings.word_embeddings.weight".into(),
        rng.tensor(&[spec.vocab, h], std)?,
    );
    t.insert(
        "embeddings.position_embeddings.weight".into(),
        rng.tensor(&[spec.max_positions, h], std)?,
    );
    t.insert(
        "embeddings.token_type_embeddings.weight".into(),
        rng.tensor(&[2, h], std)?,
    );
    layer_norm(&mut t, &mut rng, "embeddings.LayerNorm", h)?;
    for i in 0..spec.layers {
        let p = format!("encoder.layer.{i}");
        for name in ["query", "key", "value"] {
            linear(
                &mut t,
                &mut rng,
                &format!("{p}.attention.self.{name}"),
                (h, h),
                false,
                std,
            )?;
        }
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.attention.output.dense"),
            (h, h),
            false,
            std,
        )?;
        layer_norm(
            &mut t,
            &mut rng,
            &format!("{p}.attention.output.LayerNorm"),
            h,
        )?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.intermediate.dense"),
            (h, spec.intermediate),
            false,
            std,
        )?;
        linear(
            &mut t,
            &mut rng,
            &format!("{p}.output.dense"),
            (spec.intermediate, h),
            false,
            std,
        )?;
        layer_norm(&mut t, &mut rng, &format!("{p}.output.LayerNorm"), h)?;
    }
    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": h,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.intermediate,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    });
    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]);
    let pooling = json!({
        "word_embedding_dimension": h,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
    });
    crate::atomic::write_text(
        &dir.join("modules.json"),
        &serde_json::to_string_pretty(&modules)?,
    )?;
    crate::atomic::write_text(
        &dir.join("1_Pooling/config.json"),
        &serde_json::to_string_pretty(&pooling)?,
    )?;
    write_checkpoint(dir, &config, &t)
}

/// SplitMix64: a small, seedable generator.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Writes random weights of `kind` exit heads after the layers `points` of the model `graph`
/// (as `InsertExits` reads them from its `weights:` file) into the safetensors file `path`:
/// norm weights near one, every other weight normal with standard deviation `std`.
pub fn write_random_exit_heads(
    path: &Path,
    graph: &exitgraph_ir::Graph,
    kind: &exitgraph_passes::HeadKind,
    points: &[usize],
    seed: u64,
    std: f32,
) -> anyhow::Result<()> {
    use exitgraph_passes::exits::head_weights;
    let mut rng = Normal::new(seed);
    let dims = exitgraph_passes::HeadDims::of(graph);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for &k in points {
        for (name, shape) in head_weights(kind, false, k, &dims) {
            let tensor = if name.ends_with("norm.weight") {
                (rng.tensor(&shape, 0.1)? + 1.0)?
            } else {
                rng.tensor(&shape, std)?
            };
            t.insert(name, tensor);
        }
    }
    Ok(crate::tensor_io::write_atomic(path, &t)?)
}
