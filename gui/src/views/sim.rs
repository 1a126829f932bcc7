//! Simulator view: serve a workload with the simulated executor, or load a trace written by
//! `exitgraph serve --trace`; plot throughput, time between tokens and batch occupancy per
//! layer over time, and exit depths. Traces are aggregated once, when they arrive.

use crate::jobs::Job;
use crate::loaded::Loaded;
use crate::serving::{simulate, SimRun};
use crate::trace_stats::{load, summarize, TraceSummary};
use eframe::egui::{self, Color32, Ui};
use egui_plot::{Bar, BarChart, Legend, Line, Plot};
use exitgraph::runtime::metrics::ServeReport;
use exitgraph::runtime::policy::Batching;
use exitgraph::runtime::trace::TraceRecord;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Static,
    Continuous,
    DepthWise,
    /// Continuous depth-wise batching over a looped model's iterations.
    Looped,
}

type SimResult = (ServeReport, TraceSummary);

pub struct SimView {
    pub workload: String,
    pub workloads: Vec<PathBuf>,
    pub cost: String,
    pub policy: Policy,
    pub max_batch: usize,
    pub stages: usize,
    pub trace_path: String,
    job: Option<Job<SimResult>>,
    pub report: Option<ServeReport>,
    pub summary: Option<TraceSummary>,
    /// Where the plotted data came from.
    pub source: String,
    pub error: Option<String>,
}

/// Rows per stage over time, one series per stage, from a report with more than one stage
/// (each step's rows at each stage, at the step's end time).
pub fn stage_series(report: &ServeReport) -> Vec<Vec<[f64; 2]>> {
    let stages = report.mean_stage_rows.len();
    if stages < 2 {
        return Vec::new();
    }
    (0..stages)
        .map(|k| {
            report
                .occupancy
                .iter()
                .zip(&report.stage_rows)
                .map(|((t, _), rows)| [*t, rows.get(k).copied().unwrap_or(0) as f64])
                .collect()
        })
        .collect()
}

/// Each point's value replaced by the mean of the `w` points ending at it (fewer at the
/// start): per-step counts alternate too fast to read.
pub fn running_mean(pts: &[[f64; 2]], w: usize) -> Vec<[f64; 2]> {
    let w = w.max(1);
    let mut sum = 0.0;
    pts.iter()
        .enumerate()
        .map(|(i, p)| {
            sum += p[1];
            if i >= w {
                sum -= pts[i - w][1];
            }
            [p[0], sum / (i + 1).min(w) as f64]
        })
        .collect()
}

/// The repository's `examples/` folder.
pub fn examples_dir() -> PathBuf {
    crate::paths::friendly(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"))
}

impl Default for SimView {
    fn default() -> Self {
        let dir = examples_dir().join("workloads");
        let mut workloads: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "ron"))
                    .collect()
            })
            .unwrap_or_default();
        workloads.sort();
        SimView {
            workload: dir.join("poisson.ron").display().to_string(),
            workloads,
            cost: examples_dir().join("demo-cost.ron").display().to_string(),
            policy: Policy::Continuous,
            max_batch: 8,
            stages: 2,
            trace_path: String::new(),
            job: None,
            report: None,
            summary: None,
            source: String::new(),
            error: None,
        }
    }
}

impl SimView {
    fn batching(&self) -> Batching {
        match self.policy {
            Policy::Static => Batching::Static {
                max_batch: self.max_batch,
            },
            Policy::Continuous => Batching::Continuous {
                max_batch: self.max_batch,
                token_budget: 512,
            },
            Policy::DepthWise => Batching::DepthWise {
                max_batch: self.max_batch,
                stages: self.stages,
            },
            Policy::Looped => Batching::LoopedDepthWise {
                max_batch: self.max_batch,
                token_budget: 512,
                priority: exitgraph::runtime::policy::Priority::DeepestFirst,
            },
        }
    }

    /// Starts a simulated run on a background thread.
    pub fn start(&mut self, loaded: &Loaded, wake: Option<egui::Context>) {
        let sim = SimRun {
            workload: PathBuf::from(self.workload.trim()),
            cost: PathBuf::from(self.cost.trim()),
            batching: self.batching(),
            sampling: loaded.pipeline.runtime.sampling.clone(),
            seed: loaded.pipeline.runtime.seed,
            depth: loaded.pipeline.runtime.depth.clone(),
        };
        let source = loaded.source();
        self.error = None;
        let depth_note = match &sim.depth {
            exitgraph::exits::Depth::EarlyExit { .. } => {
                " at full depth (exit rules need the real executor: use the Run tab)"
            }
            exitgraph::exits::Depth::SkipDecode(_) => " with SkipDecode",
            exitgraph::exits::Depth::SelfSpeculative { .. } => {
                " at full depth (drafts are judged by the model: use the Run tab)"
            }
            exitgraph::exits::Depth::Full => "",
        };
        self.source = format!(
            "simulated: {} with {:?}{depth_note}",
            Path::new(self.workload.trim())
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().to_string()),
            sim.batching
        );
        self.job = Some(Job::spawn(wake, move |r| {
            let (report, records) = simulate(&source, &sim, Some(r))?;
            r.set(1.0, "aggregating the trace");
            Ok((report, summarize(&records)))
        }));
    }

    /// Loads and aggregates a trace file (on the calling thread).
    pub fn load_trace(&mut self, path: &Path) {
        match load(path) {
            Ok(records) => self.set_trace(&records, path.display().to_string()),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Shows these records (aggregated now, once).
    pub fn set_trace(&mut self, records: &[TraceRecord], source: String) {
        self.summary = Some(summarize(records));
        self.report = None;
        self.source = source;
        self.error = None;
    }

    pub fn running(&self) -> bool {
        self.job.is_some()
    }

    pub fn poll(&mut self) {
        let Some(job) = &self.job else { return };
        let Some(result) = job.poll() else { return };
        self.job = None;
        match result {
            Ok((report, summary)) => {
                self.report = Some(report);
                self.summary = Some(summary);
            }
            Err(e) => self.error = Some(e),
        }
    }

    pub fn show(&mut self, ui: &mut Ui, loaded: Option<&Loaded>) {
        self.poll();
        egui::Panel::left("sim_inputs")
            .resizable(true)
            .default_size(320.0)
            .show(ui, |ui| self.inputs(ui, loaded));
        let Some(s) = &self.summary else {
            ui.label("Run a simulation or load a trace to see throughput, latency and occupancy.");
            return;
        };
        ui.label(&self.source);
        ui.label(format!(
            "{} tokens, {} sequences, {} steps over {:.2} s; time between tokens p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            s.records, s.sequences, s.steps, s.end_s, s.tbt_percentiles[0], s.tbt_percentiles[1], s.tbt_percentiles[2]
        ));
        if let Some(r) = &self.report {
            ui.label(format!(
                "{} of {} requests completed; throughput {:.0} tok/s; end-to-end p50 {:.1} ms, p99 {:.1} ms; first token p50 {:.1} ms; mean batch {:.2}",
                r.completed, r.requests, r.throughput_tok_s, r.e2e.p50_ms, r.e2e.p99_ms, r.ttft.p50_ms, r.mean_batch
            ));
        }
        let h = ((ui.available_height() - 40.0) / 2.0).max(120.0);
        let w = ((ui.available_width() - 16.0) / 2.0).max(200.0);
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.strong("Throughput (tokens/s)");
                Plot::new("throughput")
                    .width(w)
                    .height(h)
                    .include_y(0.0)
                    .x_axis_label("time (s)")
                    .show(ui, |p| {
                        p.line(
                            Line::new("tokens/s", s.throughput.clone())
                                .color(Color32::from_rgb(30, 136, 229)),
                        );
                    });
            });
            ui.vertical(|ui| {
                ui.strong("Time between tokens (ms)");
                Plot::new("tbt")
                    .width(w)
                    .height(h)
                    .include_y(0.0)
                    .x_axis_label("time (s)")
                    .show(ui, |p| {
                        p.line(
                            Line::new("mean ms", s.tbt_ms.clone())
                                .color(Color32::from_rgb(229, 115, 0)),
                        );
                    });
            });
        });
        ui.horizontal(|ui| {
            ui.vertical(|ui| {
                ui.strong("Batch occupancy by depth (tokens per step that ran each layer)");
                Plot::new("occupancy")
                    .width(w)
                    .height(h)
                    .include_y(0.0)
                    .x_axis_label("time (s)")
                    .legend(Legend::default())
                    .show(ui, |p| {
                        p.line(
                            Line::new("sequences/step", s.batch.clone())
                                .color(Color32::GRAY)
                                .width(2.5),
                        );
                        // Rows per stage (under looped batching, per loop iteration), from
                        // the report of a simulated run.
                        let unit = if self.policy == Policy::Looped {
                            "iteration"
                        } else {
                            "stage"
                        };
                        for (k, pts) in self
                            .report
                            .as_ref()
                            .map(stage_series)
                            .unwrap_or_default()
                            .into_iter()
                            .enumerate()
                        {
                            let w = (pts.len() / 60).max(4);
                            p.line(
                                Line::new(
                                    format!("{unit} {k} rows/step (mean of {w} steps)"),
                                    running_mean(&pts, w),
                                )
                                .style(egui_plot::LineStyle::dashed_dense())
                                .width(2.0),
                            );
                        }
                        let n = s.occupancy_by_layer.len().max(1);
                        for (l, pts) in s.occupancy_by_layer.iter().enumerate() {
                            let t = l as f32 / (n.max(2) - 1) as f32;
                            p.line(
                                Line::new(format!("layer {l}"), pts.clone())
                                    .color(crate::views::run::signal_color(t)),
                            );
                        }
                    });
            });
            ui.vertical(|ui| {
                ui.strong("Exit layers");
                let bars: Vec<Bar> = s
                    .exit_histogram
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(k, &n)| Bar::new(k as f64, n as f64).width(0.7))
                    .collect();
                Plot::new("sim_exits")
                    .width(w)
                    .height(h)
                    .include_y(0.0)
                    .x_axis_label("layers run before exit")
                    .show(ui, |p| {
                        p.bar_chart(
                            BarChart::new("tokens", bars).color(Color32::from_rgb(30, 136, 229)),
                        );
                    });
            });
        });
    }

    fn inputs(&mut self, ui: &mut Ui, loaded: Option<&Loaded>) {
        ui.heading("Simulate");
        let wl = ui.label("Workload");
        egui::ComboBox::new("workload_pick", "examples")
            .selected_text(
                Path::new(self.workload.trim())
                    .file_name()
                    .map_or_else(|| "choose".to_string(), |f| f.to_string_lossy().to_string()),
            )
            .show_ui(ui, |ui| {
                for w in &self.workloads {
                    let name = w
                        .file_name()
                        .map_or_else(String::new, |f| f.to_string_lossy().to_string());
                    let p = w.display().to_string();
                    let sel = self.workload == p;
                    if ui.selectable_label(sel, name).clicked() {
                        self.workload = p;
                    }
                }
            });
        ui.add(egui::TextEdit::singleline(&mut self.workload).desired_width(f32::INFINITY))
            .labelled_by(wl.id);
        let cl = ui.label("Cost model (from `exitgraph profile`)");
        ui.add(egui::TextEdit::singleline(&mut self.cost).desired_width(f32::INFINITY))
            .labelled_by(cl.id);
        ui.horizontal(|ui| {
            ui.label("policy");
            ui.selectable_value(&mut self.policy, Policy::Static, "static");
            ui.selectable_value(&mut self.policy, Policy::Continuous, "continuous");
            ui.selectable_value(&mut self.policy, Policy::DepthWise, "depth-wise");
            ui.selectable_value(&mut self.policy, Policy::Looped, "looped")
                .on_hover_text("continuous depth-wise batching over a looped (TieLayers) model");
        });
        ui.horizontal(|ui| {
            let mb = ui.label("max batch");
            ui.add(egui::DragValue::new(&mut self.max_batch).range(1..=1024))
                .labelled_by(mb.id);
            if self.policy == Policy::DepthWise {
                let st = ui.label("stages");
                ui.add(egui::DragValue::new(&mut self.stages).range(1..=64))
                    .labelled_by(st.id);
            }
        });
        let running = self.running();
        match loaded {
            Some(l) => {
                if ui
                    .add_enabled(!running, egui::Button::new("Run simulation"))
                    .clicked()
                {
                    self.start(l, Some(ui.ctx().clone()));
                }
            }
            None => {
                ui.label("Compile a pipeline first.");
            }
        }
        if let Some(job) = &self.job {
            let p = job.progress();
            ui.add(
                egui::ProgressBar::new(p.fraction)
                    .text(p.message)
                    .animate(true),
            );
        }
        ui.separator();
        ui.heading("Trace file");
        let tl = ui.label("JSON Lines from `exitgraph serve --trace FILE`");
        ui.add(
            egui::TextEdit::singleline(&mut self.trace_path)
                .hint_text("trace.jsonl")
                .desired_width(f32::INFINITY),
        )
        .labelled_by(tl.id);
        if ui.button("Load trace").clicked() {
            let p = PathBuf::from(self.trace_path.trim());
            self.load_trace(&p);
        }
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }
}

#[cfg(test)]
mod stage_tests {
    use super::*;

    #[test]
    fn stage_series_follow_the_steps() {
        let mut r = ServeReport::from_outcomes(&[], 2, 0.0, vec![(0.5, 3), (1.0, 2)]);
        r.set_stage_rows(vec![vec![2, 1], vec![0, 2]]);
        assert_eq!(
            stage_series(&r),
            vec![vec![[0.5, 2.0], [1.0, 0.0]], vec![[0.5, 1.0], [1.0, 2.0]]]
        );
        assert_eq!(
            running_mean(&[[0.0, 2.0], [1.0, 0.0], [2.0, 4.0], [3.0, 1.0]], 2),
            vec![[0.0, 2.0], [1.0, 1.0], [2.0, 2.0], [3.0, 2.5]]
        );
        // One stage: nothing beyond the total.
        r.set_stage_rows(vec![vec![3], vec![2]]);
        assert!(stage_series(&r).is_empty());
    }
}
