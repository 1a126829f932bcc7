//! The training loop: gradient accumulation, clipping, AdamW with a schedule, periodic
//! evaluation, atomic checkpoints and exact resume, with a progress bar.
//!
//! Data order is the caller's: the loss function receives `(step, micro_batch)` and must
//! derive its batch from them (and a seed) alone, so a resumed run sees the same batches.

use super::optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};
use super::params::ParamStore;
use anyhow::Context;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn default_accum() -> usize {
    1
}

/// Settings of the optimisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: usize,
    /// Micro-batches whose gradients add up to one step.
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    pub lr: f64,
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub adamw: Option<AdamWConfig>,
    /// Clip the global gradient norm to this.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// (step, mean training loss of that step).
    pub train_loss: Vec<(usize, f64)>,
    /// (step, evaluation loss).
    pub eval_loss: Vec<(usize, f64)>,
    pub tokens: u64,
    pub seconds: f64,
}

/// The step a checkpoint folder resumes at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    log: TrainLog,
}

/// Whether `name` is a complete checkpoint folder's name: `step-` and digits.
fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("step-")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A training run over a [`ParamStore`].
pub struct Trainer<'a> {
    pub cfg: TrainConfig,
    pub params: &'a mut ParamStore,
    opt: AdamW,
    /// Next step to run.
    pub step: usize,
    pub log: TrainLog,
    checkpoint_dir: Option<PathBuf>,
    pub show_progress: bool,
    /// Stop (with a checkpoint) after this step, as an interrupted run would; the schedule
    /// still spans `cfg.steps`.
    pub stop_at: Option<usize>,
}

impl<'a> Trainer<'a> {
    pub fn new(cfg: TrainConfig, params: &'a mut ParamStore) -> Self {
        let opt = AdamW::new(cfg.adamw.unwrap_or_default());
        Trainer {
            cfg,
            params,
            opt,
            step: 0,
            log: TrainLog::default(),
            checkpoint_dir: None,
            show_progress: true,
            stop_at: None,
        }
    }

    /// Checkpoints go to `dir` (`latest` names the newest complete one).
    pub fn with_checkpoints(mut self, dir: &Path) -> Self {
        self.checkpoint_dir = Some(dir.to_path_buf());
        self
    }

    /// Continues from the newest checkpoint in the checkpoint folder, if there is one.
    /// Returns the step it resumes at. The checkpoint `latest` names is tried first; when the
    /// pointer or that checkpoint cannot be read, the newest other complete `step-*` folder
    /// is used (and said on stderr), so an interrupted write never loses the run.
    pub fn resume(&mut self) -> anyhow::Result<Option<usize>> {
        let Some(dir) = self.checkpoint_dir.clone() else {
            return Ok(None);
        };
        let latest = dir.join("latest");
        // What `latest` names, or why it names nothing usable (a corrupt pointer is not
        // followed anywhere: it falls back like a missing one, and says so).
        let (named, pointer_problem) = match std::fs::read(&latest) {
            Ok(bytes) => match std::str::from_utf8(&bytes).map(str::trim) {
                Ok(n) if is_checkpoint_name(n) => (Some(n.to_string()), None),
                _ => {
                    let shown: String = String::from_utf8_lossy(&bytes).chars().take(40).collect();
                    (
                        None,
                        Some(format!(
                            "does not name a checkpoint folder (it holds {shown:?})"
                        )),
                    )
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, None),
            Err(e) => (None, Some(format!("cannot read: {e}"))),
        };
        let mut folders: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| is_checkpoint_name(n))
                    .collect()
            })
            .unwrap_or_default();
        folders.sort_unstable_by(|a, b| b.cmp(a));
        let candidates: Vec<String> = named
            .iter()
            .cloned()
            .chain(folders.into_iter().filter(|f| Some(f) != named.as_ref()))
            .collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        let mut first_error = None;
        for name in &candidates {
            match self.restore_from(&dir.join(name)) {
                Ok(step) => {
                    if Some(name) != named.as_ref() {
                        let why = match (&pointer_problem, &first_error) {
                            (Some(p), _) => p.clone(),
                            (None, Some(e)) => format!("{e:#}"),
                            (None, None) => "missing".to_string(),
                        };
                        eprintln!(
                            "warning: {}: {why}; resuming from {name} instead",
                            latest.display()
                        );
                    }
                    return Ok(Some(step));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let e = first_error.unwrap_or_else(|| anyhow::anyhow!("no checkpoint"));
        let pointer = pointer_problem
            .map(|p| format!("; {}: {p}", latest.display()))
            .unwrap_or_default();
        Err(e.context(format!(
            "{}: no checkpoint could be resumed (tried {}){pointer}",
            dir.display(),
            candidates.join(", ")
        )))
    }

    /// Restores parameters, optimizer moments, step and log from one checkpoint folder.
    fn restore_from(&mut self, ckpt: &Path) -> anyhow::Result<usize> {
        let state_path = ckpt.join("state.json");
        let state: CheckpointState = serde_json::from_str(
            &std::fs::read_to_string(&state_path)
                .with_context(|| format!("{}: cannot read", state_path.display()))?,
        )
        .with_context(|| format!("{}: invalid checkpoint state", state_path.display()))?;
        self.params.restore(&ckpt.join("params.safetensors"))?;
        let device = self
            .params
            .trainable()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        self.opt
            .restore(&ckpt.join("optimizer.safetensors"), &device)?;
        self.step = state.step;
        self.log = state.log;
        Ok(self.step)
    }

    /// Writes a checkpoint of the state after `self.step - 1` steps.
    pub fn checkpoint(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        let name = format!("step-{:08}", self.step);
        // Written under a temporary name and renamed once complete, so a `step-*` folder
        // is always a whole checkpoint.
        let ckpt = dir.join(format!("{name}.partial"));
        let _ = std::fs::remove_dir_all(&ckpt);
        std::fs::create_dir_all(&ckpt)
            .with_context(|| format!("{}: cannot create", ckpt.display()))?;
        self.params.save(&ckpt.join("params.safetensors"))?;
        self.opt.save(&ckpt.join("optimizer.safetensors"))?;
        let state = CheckpointState {
            step: self.step,
            log: self.log.clone(),
        };
        exitgraph_compiler::atomic::write_text(
            &ckpt.join("state.json"),
            &serde_json::to_string_pretty(&state)?,
        )?;
        let done = dir.join(&name);
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&ckpt, &done)
            .with_context(|| format!("{}: cannot write", done.display()))?;
        exitgraph_compiler::atomic::sync_folder(&done);
        // The pointer moves only once the checkpoint is complete.
        let previous = std::fs::read_to_string(dir.join("latest")).ok();
        exitgraph_compiler::atomic::write_text(&dir.join("latest"), &name)?;
        if let Some(prev) = previous {
            let prev = prev.trim();
            if prev != name && is_checkpoint_name(prev) {
                let _ = std::fs::remove_dir_all(dir.join(prev));
            }
        }
        Ok(())
    }

    /// Runs until `cfg.steps`. `loss` returns the mean loss of micro-batch `micro` of
    /// `step` and its token count; `eval` returns an evaluation loss.
    pub fn run(
        &mut self,
        loss: &mut dyn FnMut(usize, usize) -> anyhow::Result<(Tensor, usize)>,
        eval: &mut dyn FnMut() -> anyhow::Result<f64>,
    ) -> anyhow::Result<TrainLog> {
        let schedule = Schedule {
            peak: self.cfg.lr,
            min: self.cfg.min_lr,
            warmup: self.cfg.warmup_steps,
            total: self.cfg.steps,
        };
        let accum = self.cfg.grad_accum.max(1);
        let bar = if self.show_progress {
            ProgressBar::new(self.cfg.steps as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} ({elapsed}, eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(self.step as u64);
        let started = Instant::now();
        let mut window_tokens = 0u64;
        let mut window_start = Instant::now();
        let end = self.stop_at.unwrap_or(self.cfg.steps).min(self.cfg.steps);
        while self.step < end {
            let lr = schedule.at(self.step);
            let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
            let mut step_loss = 0.0;
            for micro in 0..accum {
                let (l, tokens) = loss(self.step, micro)?;
                step_loss +=
                    l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / accum as f64;
                let scaled = (l / accum as f64)?;
                let g = scaled.backward()?;
                for (name, var) in self.params.trainable() {
                    if let Some(gi) = g.get(var.as_tensor()) {
                        let sum = match grads.remove(name) {
                            Some(acc) => (acc + gi)?,
                            None => gi.clone(),
                        };
                        grads.insert(name.to_string(), sum);
                    }
                }
                window_tokens += tokens as u64;
                self.log.tokens += tokens as u64;
            }
            if !step_loss.is_finite() {
                anyhow::bail!(
                    "training diverged at step {}: loss is {step_loss}",
                    self.step
                );
            }
            if let Some(max) = self.cfg.clip_norm {
                clip_grad_norm(&mut grads, max)?;
            }
            let trainable = self.params.trainable();
            self.opt.step(&trainable, &grads, lr)?;
            self.log.train_loss.push((self.step, step_loss));
            self.step += 1;
            let secs = window_start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {step_loss:.4} lr {lr:.2e} {:.0} tok/s",
                window_tokens as f64 / secs.max(1e-9)
            ));
            if secs > 10.0 {
                window_tokens = 0;
                window_start = Instant::now();
            }
            bar.set_position(self.step as u64);
            let last = self.step == end;
            if self.step == self.cfg.steps
                || (self.cfg.eval_every > 0 && self.step % self.cfg.eval_every == 0)
            {
                let e = eval()?;
                self.log.eval_loss.push((self.step, e));
                let line = format!(
                    "step {:>6}: train loss {step_loss:.4}, eval loss {e:.4}",
                    self.step
                );
                if bar.is_hidden() {
                    tracing::info!("{line}");
                } else {
                    bar.println(line);
                }
            }
            if last || (self.cfg.checkpoint_every > 0 && self.step % self.cfg.checkpoint_every == 0)
            {
                self.checkpoint()?;
            }
        }
        bar.finish_and_clear();
        self.log.seconds += started.elapsed().as_secs_f64();
        Ok(self.log.clone())
    }
}
