//! Run view: prompts in, generation on a background thread with a progress bar, then the
//! token × layer heatmap (layers run, exit signals, exit cells; over a tied model its columns
//! are (loop, layer), loop iterations set apart), each token's compute path on the graph, and
//! the exit-layer histogram. Under GemFilter, each prompt's tokens with the ones the full
//! model ran on marked, shaded by the filter layer's score.

use crate::heatmap::{build, normalize, Heatmap};
use crate::jobs::Job;
use crate::loaded::Loaded;
use crate::looping::Looping;
use crate::serving::{run_prompts, PromptResult, PromptRun};
use crate::tokens::prompts_from_text;
use eframe::egui::{self, Color32, RichText, Sense, Stroke, Ui};
use egui_plot::{Bar, BarChart, Plot};
use exitgraph::runtime::metrics::Speculated;

/// A finished run, ready to draw.
pub struct RunData {
    pub heatmap: Heatmap,
    pub histogram: Vec<u64>,
    /// (prompt, generated text) per prompt.
    pub outputs: Vec<(String, String)>,
    /// GemFilter's selection of each prompt that has one.
    pub selections: Vec<SelectionView>,
}

/// One prompt's GemFilter selection, ready to draw.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectionView {
    /// Index of the prompt.
    pub prompt: usize,
    /// The filter layer (0-based).
    pub layer: usize,
    /// The average pool's kernel.
    pub pool: usize,
    /// Prompt positions always kept at the start and at the end (`keep_first`, `keep_last`;
    /// 0 and 0 in the reference method).
    pub forced: (usize, usize),
    /// Per prompt token: its text, whether it was kept, its score, its pooled score (what
    /// the selection ranks).
    pub tokens: Vec<(String, bool, f32, f32)>,
}

impl SelectionView {
    pub fn kept(&self) -> usize {
        self.tokens.iter().filter(|t| t.1).count()
    }
}

/// A kept token's background: light to strong green as its score rises from the prompt's
/// lowest (`t` = 0) to its highest (`t` = 1).
pub fn kept_color(t: f32) -> Color32 {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f32, b: f32| (a + (b - a) * t) as u8;
    Color32::from_rgb(lerp(205.0, 46.0), lerp(236.0, 160.0), lerp(205.0, 67.0))
}

/// A dropped token's background.
pub const DROPPED: Color32 = Color32::from_rgb(232, 232, 232);

impl RunData {
    pub fn new(result: &PromptResult, prompts: &[String], loaded: &Loaded) -> Self {
        let tokens = loaded.tokens.clone();
        let heatmap = build(&result.records, loaded.depth(), |id| tokens.token(id))
            .with_looping(Looping::of(&loaded.after));
        let histogram = heatmap.exit_histogram();
        let outputs = prompts
            .iter()
            .zip(&result.outputs)
            .map(|(p, ids)| (p.clone(), tokens.text(ids)))
            .collect();
        let (layer, pool, forced) = loaded.after.filter.as_ref().map_or((0, 1, (0, 0)), |f| {
            (f.layer, f.pool, (f.keep_first, f.keep_last))
        });
        let selections = result
            .selections
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                let pooled = exitgraph::gemfilter::pool_scores(&s.scores, pool);
                let tokens = s
                    .prompt
                    .iter()
                    .enumerate()
                    .map(|(p, &id)| {
                        (
                            tokens.token(id),
                            s.kept.binary_search(&p).is_ok(),
                            s.scores.get(p).copied().unwrap_or(f32::NAN),
                            pooled.get(p).copied().unwrap_or(f32::NAN),
                        )
                    })
                    .collect();
                Some(SelectionView {
                    prompt: i,
                    layer,
                    pool,
                    forced,
                    tokens,
                })
            })
            .collect();
        RunData {
            heatmap,
            histogram,
            outputs,
            selections,
        }
    }
}

/// What the run view asks of the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunAction {
    None,
    /// Show the compute path of this heatmap row in the graph view.
    ShowPath(usize),
    /// Switch to the graph view.
    OpenGraph,
}

pub struct RunView {
    pub prompts: String,
    pub prompts_file: String,
    pub max_new_tokens: usize,
    pub job: Option<(Job<PromptResult>, Vec<String>)>,
    pub result: Option<RunData>,
    pub error: Option<String>,
    pub selected: Option<usize>,
}

impl Default for RunView {
    fn default() -> Self {
        RunView {
            prompts: "copy: K7F2Q | K\nsome birds are cold\nadd: 347+285=".to_string(),
            prompts_file: String::new(),
            max_new_tokens: 8,
            job: None,
            result: None,
            error: None,
            selected: None,
        }
    }
}

const RAN: Color32 = Color32::from_rgb(30, 136, 229);

/// Signal colour: dark blue (low) to yellow (high).
pub fn signal_color(t: f32) -> Color32 {
    let stops = [
        (13.0, 8.0, 135.0),
        (156.0, 23.0, 158.0),
        (237.0, 121.0, 83.0),
        (240.0, 249.0, 33.0),
    ];
    let x = t.clamp(0.0, 1.0) * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let lerp = |a: f32, b: f32| (a + (b - a) * f) as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    Color32::from_rgb(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

impl RunView {
    /// Starts generating from the prompts on a background thread.
    pub fn start(&mut self, loaded: &Loaded, wake: Option<egui::Context>) {
        let prompts = prompts_from_text(&self.prompts);
        if prompts.is_empty() {
            self.error = Some("enter at least one prompt (one per line)".into());
            return;
        }
        if !loaded.after.info.family.is_decoder() {
            self.error = Some(format!(
                "{} is an encoder: it does not generate tokens",
                loaded.after.info.model_type
            ));
            return;
        }
        let ids: Result<Vec<Vec<u32>>, String> = prompts
            .iter()
            .map(|p| loaded.tokens.encode(p).map_err(|e| format!("{p:?}: {e:#}")))
            .collect();
        let ids = match ids {
            Ok(ids) => ids,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        let rt = &loaded.pipeline.runtime;
        let run = PromptRun {
            prompts: ids,
            max_new_tokens: self.max_new_tokens,
            sampling: rt.sampling.clone(),
            seed: rt.seed,
            stop_ids: if rt.stop_at_eos {
                loaded.after.info.eos_token_ids.clone()
            } else {
                Vec::new()
            },
            depth: rt.depth.clone(),
            skipped_kv: rt.skipped_kv,
        };
        let source = loaded.source();
        self.error = None;
        self.job = Some((
            Job::spawn(wake, move |r| run_prompts(&source, &run, Some(r))),
            prompts,
        ));
    }

    /// Takes a finished job's result.
    pub fn poll(&mut self, loaded: Option<&Loaded>) {
        let Some((job, _)) = &self.job else { return };
        let Some(result) = job.poll() else { return };
        let prompts = self.job.take().map(|(_, p)| p).unwrap_or_default();
        match (result, loaded) {
            (Ok(r), Some(l)) => {
                self.result = Some(RunData::new(&r, &prompts, l));
                self.selected = None;
            }
            (Ok(_), None) => self.error = Some("the pipeline changed during the run".into()),
            (Err(e), _) => self.error = Some(e),
        }
    }

    pub fn running(&self) -> bool {
        self.job.is_some()
    }

    pub fn show(&mut self, ui: &mut Ui, loaded: Option<&Loaded>) -> RunAction {
        self.poll(loaded);
        let mut action = RunAction::None;
        let Some(loaded) = loaded else {
            ui.label(
                "No pipeline is compiled: fix the pipeline in the Pipeline tab and press Apply.",
            );
            return action;
        };
        egui::Panel::left("run_inputs")
            .resizable(true)
            .default_size(320.0)
            .show(ui, |ui| {
                ui.heading("Prompts");
                let hint = ui.label("One prompt per line.");
                ui.add(
                    egui::TextEdit::multiline(&mut self.prompts)
                        .desired_rows(6)
                        .desired_width(f32::INFINITY),
                )
                .labelled_by(hint.id);
                ui.horizontal(|ui| {
                    ui.add(
                        egui::TextEdit::singleline(&mut self.prompts_file)
                            .hint_text("prompts file (one per line)")
                            .desired_width(200.0),
                    )
                    .labelled_by(hint.id);
                    if ui.button("Load").clicked() {
                        match std::fs::read_to_string(self.prompts_file.trim()) {
                            Ok(t) => {
                                self.prompts = t;
                                self.error = None;
                            }
                            Err(e) => {
                                self.error = Some(format!("{}: {e}", self.prompts_file.trim()));
                            }
                        }
                    }
                });
                ui.horizontal(|ui| {
                    let l = ui.label("new tokens");
                    ui.add(egui::DragValue::new(&mut self.max_new_tokens).range(1..=512))
                        .labelled_by(l.id);
                });
                ui.horizontal(|ui| {
                    let running = self.running();
                    if ui
                        .add_enabled(!running, egui::Button::new("Run prompts"))
                        .clicked()
                    {
                        self.start(loaded, Some(ui.ctx().clone()));
                    }
                    ui.weak(format!(
                        "{} layers, {:?}",
                        loaded.depth(),
                        loaded.pipeline.runtime.sampling
                    ));
                });
                if let Some((job, _)) = &self.job {
                    let p = job.progress();
                    ui.add(
                        egui::ProgressBar::new(p.fraction)
                            .text(p.message)
                            .animate(true),
                    );
                }
                if let Some(e) = &self.error {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
                if let Some(r) = &self.result {
                    ui.separator();
                    ui.heading("Outputs");
                    egui::ScrollArea::vertical()
                        .id_salt("outputs")
                        .max_height(160.0)
                        .show(ui, |ui| {
                            for (i, (p, o)) in r.outputs.iter().enumerate() {
                                ui.label(
                                    RichText::new(format!("#{} {p} -> {o}", i + 1)).monospace(),
                                );
                            }
                        });
                    if !r.selections.is_empty() {
                        ui.separator();
                        ui.heading("GemFilter");
                        egui::ScrollArea::vertical()
                            .id_salt("gemfilter")
                            .max_height(200.0)
                            .show(ui, |ui| {
                                for s in &r.selections {
                                    selection_ui(ui, s);
                                }
                            });
                    }
                    ui.separator();
                    ui.heading("Exit layers");
                    histogram(ui, &r.histogram);
                }
            });
        let Some(r) = &self.result else {
            ui.label("Press Run to generate; each generated token gets a row showing the layers it used.");
            return action;
        };
        if let Some(a) = heatmap_ui(ui, &r.heatmap, &mut self.selected) {
            action = a;
        }
        action
    }
}

/// A prompt's tokens in order, the kept ones green (darker for higher pooled scores, which
/// the selection ranks), the dropped ones grey; hovering a token shows its position, score
/// and pooled score.
fn selection_ui(ui: &mut Ui, s: &SelectionView) {
    let forced = match s.forced {
        (0, 0) => String::new(),
        (a, b) => format!("; the first {a} and last {b} always kept"),
    };
    ui.label(format!(
        "#{} kept {} of {} prompt tokens (layer {}'s last-query scores, pooled over {}{forced})",
        s.prompt + 1,
        s.kept(),
        s.tokens.len(),
        s.layer,
        s.pool
    ));
    let finite = s.tokens.iter().map(|t| t.3).filter(|x| x.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, f32::min);
    let hi = finite.fold(f32::NEG_INFINITY, f32::max);
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing.x = 1.0;
        for (i, (text, kept, score, pooled)) in s.tokens.iter().enumerate() {
            let t = if hi > lo {
                (pooled - lo) / (hi - lo)
            } else {
                1.0
            };
            let (bg, fg) = if *kept {
                (kept_color(t), Color32::BLACK)
            } else {
                (DROPPED, Color32::from_gray(120))
            };
            let shown = text.replace(' ', "\u{b7}");
            ui.add(
                egui::Label::new(
                    RichText::new(shown)
                        .monospace()
                        .color(fg)
                        .background_color(bg),
                )
                .sense(Sense::hover()),
            )
            .on_hover_text(format!(
                "position {i}: score {score:.3}, pooled {pooled:.3}, {}",
                if *kept { "kept" } else { "dropped" }
            ));
        }
    });
}

fn histogram(ui: &mut Ui, h: &[u64]) {
    let bars: Vec<Bar> = h
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, &n)| Bar::new(k as f64, n as f64).width(0.7))
        .collect();
    Plot::new("exit_histogram")
        .height(160.0)
        .allow_zoom(false)
        .allow_drag(false)
        .allow_scroll(false)
        .include_y(0.0)
        .include_y(h.iter().copied().max().unwrap_or(0) as f64 * 1.1 + 1.0)
        .x_axis_label("layers run before exit")
        .y_axis_label("tokens")
        .show(ui, |p| {
            p.bar_chart(BarChart::new("tokens", bars).color(RAN))
        });
}

/// How a self-speculative token came to be, in words.
pub fn speculation_label(how: Speculated) -> &'static str {
    match how {
        Speculated::Accepted => "draft accepted",
        Speculated::Rejected => "full model's (draft rejected)",
        Speculated::Bonus => "full model's (after the drafts)",
    }
}

/// The text colour of a self-speculative token: green for a kept draft, orange for the
/// full model's replacement of a rejected draft, blue for its token after the drafts.
pub fn speculation_color(how: Speculated) -> Color32 {
    match how {
        Speculated::Accepted => Color32::from_rgb(40, 160, 70),
        Speculated::Rejected => Color32::from_rgb(230, 120, 20),
        Speculated::Bonus => Color32::from_rgb(60, 110, 220),
    }
}

/// A vertical rule between two loop iterations' columns.
fn loop_separator(ui: &mut Ui, height: f32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(3.0, height), Sense::hover());
    // Over the gap to the next row too, so that the rule reads as one line.
    let gap = ui.spacing().item_spacing.y;
    ui.painter().vline(
        rect.center().x,
        rect.expand2(egui::vec2(0.0, gap / 2.0 + 1.0)).y_range(),
        Stroke::new(2.0, ui.visuals().strong_text_color()),
    );
}

/// Draws the heatmap; returns an action when a token's path is asked for.
fn heatmap_ui(ui: &mut Ui, h: &Heatmap, selected: &mut Option<usize>) -> Option<RunAction> {
    let mut action = None;
    ui.horizontal(|ui| {
        ui.heading(match &h.looping {
            Some(_) => "Tokens × (loop, layer)",
            None => "Tokens × layers",
        });
        if let Some(row) = selected.and_then(|i| h.rows.get(i)) {
            let iterations = h
                .looping
                .as_ref()
                .map(|l| format!(" ({})", l.iterations_run(&row.layers)))
                .unwrap_or_default();
            ui.label(format!(
                "{:?}: {} layers run{iterations}; its path is outlined on the graph",
                row.text, row.exit_layer
            ));
            if ui.button("Open Graph").clicked() {
                action = Some(RunAction::OpenGraph);
            }
        }
    });
    ui.horizontal_wrapped(|ui| {
        if h.has_signals() {
            ui.label("colour: exit signal (low");
            for t in [0.0, 0.33, 0.66, 1.0] {
                let (rect, _) = ui.allocate_exact_size(egui::vec2(14.0, 12.0), Sense::hover());
                ui.painter().rect_filled(rect, 0.0, signal_color(t));
            }
            ui.label("high);");
        } else {
            let (rect, _) = ui.allocate_exact_size(egui::vec2(14.0, 12.0), Sense::hover());
            ui.painter().rect_filled(rect, 0.0, RAN);
            ui.label("layer ran (no exit rule judged these tokens, so there are no exit signals);");
        }
        ui.label("outlined: the exit the token came from. Click a token to see its path.");
        if h.has_speculation() {
            ui.label("Self-speculative tokens:");
            for how in [
                Speculated::Accepted,
                Speculated::Rejected,
                Speculated::Bonus,
            ] {
                ui.label(RichText::new(speculation_label(how)).color(speculation_color(how)));
            }
        }
        if let Some(l) = &h.looping {
            ui.label(format!(
                "Columns: loop iteration i, layer L of the shared block ({}).",
                l.summary()
            ));
        }
    });
    let headers = h.headers();
    // `i0·L0` needs a wider column than `L0`.
    let cell = egui::vec2(if h.looping.is_some() { 44.0 } else { 34.0 }, 20.0);
    let label_w = 190.0;
    // Column headers.
    ui.horizontal(|ui| {
        ui.add_sized(
            [label_w, cell.y],
            egui::Label::new(RichText::new("token").strong()),
        );
        for c in &headers {
            if c.loop_start {
                loop_separator(ui, cell.y);
            }
            ui.add_sized(cell, egui::Label::new(RichText::new(&c.text).monospace()))
                .on_hover_text(&c.hover);
        }
        ui.label("layers run");
    });
    let row_h = cell.y + 2.0;
    let outline = ui.visuals().strong_text_color();
    let idle = ui.visuals().faint_bg_color;
    egui::ScrollArea::vertical()
        .id_salt("heatmap")
        .auto_shrink([false, false])
        .show_rows(ui, row_h, h.rows.len(), |ui, range| {
            for i in range {
                let row = &h.rows[i];
                ui.horizontal(|ui| {
                    let text = format!("#{} pos {} {:?}", row.seq + 1, row.pos, row.text);
                    let sel = *selected == Some(i);
                    let mut label = RichText::new(text).monospace();
                    if let Some(how) = row.speculated {
                        label = label.color(speculation_color(how));
                    }
                    let r = ui.add_sized([label_w, cell.y], egui::Button::selectable(sel, label));
                    let r = match row.speculated {
                        Some(how) => r.on_hover_text(speculation_label(how)),
                        None => r,
                    };
                    if r.clicked() {
                        *selected = Some(i);
                        action = Some(RunAction::ShowPath(i));
                    }
                    for (c, header) in row.cells.iter().zip(&headers) {
                        if header.loop_start {
                            loop_separator(ui, cell.y);
                        }
                        let (rect, resp) = ui.allocate_exact_size(cell, Sense::hover());
                        let fill = match (c.signal, h.signal_range) {
                            (Some(v), Some(range)) => signal_color(normalize(v, range)),
                            _ if c.ran => RAN.gamma_multiply(0.75),
                            _ => idle,
                        };
                        let rect = rect.shrink(1.0);
                        ui.painter().rect_filled(rect, 2.0, fill);
                        if c.exit {
                            ui.painter().rect_stroke(
                                rect,
                                2.0,
                                Stroke::new(2.0, outline),
                                egui::StrokeKind::Inside,
                            );
                        }
                        if let Some(v) = c.signal {
                            resp.on_hover_text(format!("signal {v:.4}"));
                        }
                    }
                    ui.label(RichText::new(row.exit_layer.to_string()).monospace());
                });
            }
        });
    action
}
