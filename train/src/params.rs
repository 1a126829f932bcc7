//! Trainable parameters: every float tensor of a checkpoint as a candle `Var`, a selection of
//! which ones train (by name pattern), and atomic saving.

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use exitgraph_compiler::lower::{recipes, WeightLoadError, WeightSource};
use exitgraph_ir::{WeightCatalog, WeightRef};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// `*` matches any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The parameters of one model.
pub struct ParamStore {
    params: BTreeMap<String, Var>,
    trainable: BTreeSet<String>,
}

impl ParamStore {
    /// Loads every float tensor of the checkpoint in `root` as an f32 `Var`; all train.
    pub fn load(catalog: &WeightCatalog, root: &Path, device: &Device) -> anyhow::Result<Self> {
        let mut files: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, info) in &catalog.tensors {
            if info.dtype.is_float_weight() {
                files
                    .entry(info.file.as_str())
                    .or_default()
                    .push(name.as_str());
            }
        }
        let mut params = BTreeMap::new();
        for (file, names) in files {
            let path = root.join(file);
            let tensors = candle_core::safetensors::load(&path, device)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            for name in names {
                let t = tensors
                    .get(name)
                    .with_context(|| format!("{}: no tensor \"{name}\"", path.display()))?;
                params.insert(
                    name.to_string(),
                    Var::from_tensor(&t.to_dtype(DType::F32)?)?,
                );
            }
        }
        let trainable = params.keys().cloned().collect();
        Ok(ParamStore { params, trainable })
    }

    /// Only parameters matching one of `patterns` train; each pattern must match something.
    pub fn select(&mut self, patterns: &[String]) -> anyhow::Result<usize> {
        let mut chosen = BTreeSet::new();
        for p in patterns {
            let matched: Vec<&String> = self.params.keys().filter(|n| glob_match(p, n)).collect();
            if matched.is_empty() {
                bail!("parameter pattern \"{p}\" matches no parameter");
            }
            chosen.extend(matched.into_iter().cloned());
        }
        self.trainable = chosen;
        Ok(self.trainable.len())
    }

    /// Trainable parameters by name, sorted.
    pub fn trainable(&self) -> Vec<(&str, &Var)> {
        self.trainable
            .iter()
            .filter_map(|n| self.params.get(n).map(|v| (n.as_str(), v)))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.params.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.params.keys().map(String::as_str).collect()
    }

    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// A snapshot of the current values, by name (copies: later updates do not show).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .filter_map(|(n, v)| v.as_detached_tensor().copy().ok().map(|t| (n.clone(), t)))
            .collect()
    }

    /// Writes every parameter to `path` (safetensors) through a temporary file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        exitgraph_compiler::tensor_io::write_atomic(path, &self.tensors())?;
        Ok(())
    }

    /// Sets every parameter from a file written by [`ParamStore::save`].
    pub fn restore(&mut self, path: &Path) -> anyhow::Result<()> {
        let device = self
            .params
            .values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let saved = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        for (name, var) in &self.params {
            let t = saved
                .get(name)
                .with_context(|| format!("{}: no parameter \"{name}\"", path.display()))?;
            if t.dims() != var.dims() {
                bail!(
                    "{}: parameter \"{name}\" has shape {:?}, expected {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(t)?;
        }
        Ok(())
    }
}

impl ParamStore {
    /// Where the parameters live.
    fn device(&self) -> Device {
        self.params
            .values()
            .next()
            .map_or(Device::Cpu, |v| v.device().clone())
    }
}

impl WeightSource for ParamStore {
    fn get(&mut self, w: &WeightRef) -> Result<Tensor, WeightLoadError> {
        let wrap = |cause| WeightLoadError::Load {
            weight: w.to_string(),
            cause,
        };
        match w {
            WeightRef::File { tensor } => {
                let var = self
                    .params
                    .get(tensor)
                    .ok_or_else(|| WeightLoadError::Missing {
                        weight: w.to_string(),
                        tensor: tensor.clone(),
                    })?;
                Ok(if self.trainable.contains(tensor) {
                    var.as_tensor().clone()
                } else {
                    var.as_detached_tensor()
                })
            }
            WeightRef::Transpose(of) => self.get(of)?.t().map_err(wrap),
            WeightRef::Slice {
                of,
                dim,
                start,
                len,
            } => self.get(of)?.narrow(*dim, *start, *len).map_err(wrap),
            WeightRef::Mean(of) => {
                let parts = of
                    .iter()
                    .map(|w| self.get(w))
                    .collect::<Result<Vec<_>, _>>()?;
                recipes::mean(&parts).map_err(wrap)
            }
            WeightRef::Zeros { shape } => {
                Tensor::zeros(shape.as_slice(), DType::F32, &self.device()).map_err(wrap)
            }
            WeightRef::Uniform { shape, seed } => recipes::uniform(shape, *seed)
                .and_then(|t| t.to_device(&self.device()))
                .map_err(wrap),
            WeightRef::Svd {
                target,
                base,
                rank,
                factor,
            } => {
                let (t, b) = (self.get(target)?.detach(), self.get(base)?.detach());
                let (a, b) = recipes::svd_factors(&t, &b, *rank).map_err(wrap)?;
                match factor {
                    exitgraph_ir::SvdFactor::A => a,
                    exitgraph_ir::SvdFactor::B => b,
                }
                .to_device(&self.device())
                .map_err(wrap)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*", "model.norm.weight"));
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(glob_match("lm_head.?eight", "lm_head.weight"));
        assert!(!glob_match("lm_head", "lm_head.weight"));
    }
}
