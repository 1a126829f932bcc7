//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule, and
//! gradient clipping by global norm. Optimizer state saves and restores exactly.

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Learning rate: linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to
/// `min` at `total` steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub min: f64,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    /// The rate for 0-based `step`.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, applied to matrices (rank >= 2) only, not to norms and biases.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW state: first and second moments per parameter, and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub steps: u64,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            steps: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of `params` (name, var) with `grads` (name -> gradient) at rate `lr`.
    pub fn step(
        &mut self,
        params: &[(&str, &candle_core::Var)],
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> candle_core::Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (name, var) in params {
            let Some(g) = grads.get(*name) else { continue };
            let m = match self.m.get(*name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(*name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let mut p = var.as_detached_tensor();
            if c.weight_decay > 0.0 && p.rank() >= 2 {
                p = (&p * (1.0 - lr * c.weight_decay))?;
            }
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(p - (update * lr)?)?)?;
            self.m.insert(name.to_string(), m);
            self.v.insert(name.to_string(), v);
        }
        Ok(())
    }

    /// Writes the moments and step count (safetensors) through a temporary file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (n, m) in &self.m {
            t.insert(format!("m.{n}"), m.clone());
        }
        for (n, v) in &self.v {
            t.insert(format!("v.{n}"), v.clone());
        }
        t.insert(
            "steps".into(),
            Tensor::new(&[self.steps as i64], &Device::Cpu)?,
        );
        exitgraph_compiler::tensor_io::write_atomic(path, &t)?;
        Ok(())
    }

    /// Restores state written by [`AdamW::save`].
    pub fn restore(&mut self, path: &Path, device: &Device) -> anyhow::Result<()> {
        let t = candle_core::safetensors::load(path, device)
            .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
        self.m.clear();
        self.v.clear();
        for (k, v) in t {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), v);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), v);
            } else if k == "steps" {
                self.steps = v.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
            }
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(
    grads: &mut BTreeMap<String, Tensor>,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule {
            peak: 1e-3,
            min: 1e-4,
            warmup: 10,
            total: 110,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - 5.5e-4).abs() < 1e-9);
        assert!((s.at(110) - 1e-4).abs() < 1e-12);
        assert!((s.at(500) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = BTreeMap::new();
        g.insert(
            "a".to_string(),
            Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(),
        );
        g.insert("b".to_string(), Tensor::new(&[4f32], &Device::Cpu).unwrap());
        let before = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        let after = clip_grad_norm(&mut g, 10.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }

    #[test]
    fn adamw_matches_the_formula_on_one_scalar() {
        let var = candle_core::Var::new(&[[1.0f32]], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        });
        let mut grads = BTreeMap::new();
        grads.insert(
            "w".to_string(),
            Tensor::new(&[[0.2f32]], &Device::Cpu).unwrap(),
        );
        opt.step(&[("w", &var)], &grads, 0.1).unwrap();
        // p = 1 * (1 - 0.1 * 0.5) = 0.95; m_hat = 0.2, v_hat = 0.04; p -= 0.1 * 0.2 / 0.2.
        let p = var.as_tensor().to_vec2::<f32>().unwrap()[0][0];
        assert!((p - 0.85).abs() < 1e-5, "{p}");
    }
}
