//! Exits view: the speed/quality sweep of early-exit rules written by
//! `exitgraph eval exits --json`, as speedup against agreement with the full model.

use crate::sweep::{load, series};
use eframe::egui::{self, Ui};
use egui_plot::{Legend, Line, LineStyle, Plot, Points};
use exitgraph::eval::exits::ExitReport;
use std::path::Path;

/// Distinct colours that read on the dark theme.
const PALETTE: [egui::Color32; 8] = [
    egui::Color32::from_rgb(77, 171, 247),
    egui::Color32::from_rgb(255, 146, 43),
    egui::Color32::from_rgb(81, 207, 102),
    egui::Color32::from_rgb(240, 101, 149),
    egui::Color32::from_rgb(252, 196, 25),
    egui::Color32::from_rgb(151, 117, 250),
    egui::Color32::from_rgb(32, 201, 151),
    egui::Color32::from_rgb(233, 236, 239),
];

pub struct ExitsView {
    pub path: String,
    pub report: Option<ExitReport>,
    pub error: Option<String>,
}

/// The sweep of the demo model shipped with the repository.
pub fn demo_sweep() -> String {
    crate::paths::friendly(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/exits-demo-shallow.json"),
    )
    .display()
    .to_string()
}

impl Default for ExitsView {
    fn default() -> Self {
        let mut v = ExitsView {
            path: demo_sweep(),
            report: None,
            error: None,
        };
        if Path::new(&v.path).exists() {
            v.load();
        }
        v
    }
}

impl ExitsView {
    pub fn load(&mut self) {
        match load(Path::new(self.path.trim())) {
            Ok(r) => {
                self.report = Some(r);
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    pub fn show(&mut self, ui: &mut Ui) {
        ui.horizontal(|ui| {
            ui.label("Sweep (eval exits --json):");
            ui.add(egui::TextEdit::singleline(&mut self.path).desired_width(420.0));
            if ui.button("Load").clicked() {
                self.load();
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        let Some(r) = &self.report else {
            ui.weak(
                "Run `exitgraph eval exits PIPELINE.ron --sweep confidence=0.5:0.95:0.05 --json FILE` and load FILE.",
            );
            return;
        };
        ui.label(format!(
            "{} cases, exits after layers {:?} of {}: full model {:.0} tok/s, perplexity {:.3}. Large markers: measured speedup; dashed: ideal (FLOPs).",
            r.cases, r.exits, r.layers, r.full_tokens_per_s, r.full_perplexity
        ));
        let curves = series(r);
        let rules: Vec<String> = {
            let mut v: Vec<String> = curves.iter().map(|c| c.rule.clone()).collect();
            v.dedup();
            v
        };
        let height = (ui.available_height() * 0.6).max(200.0);
        // Headroom above the data for the legend (top right), so it covers no point.
        let ys = curves.iter().flat_map(|c| c.points.iter().map(|p| p[1]));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
        let top = if hi.is_finite() {
            hi + (hi - lo).max(0.1) * 0.04 * (curves.len() as f64 + 2.0)
        } else {
            1.0
        };
        Plot::new("exit_sweep")
            .height(height)
            .include_y(top)
            .x_axis_label("agreement with full greedy decoding (%)")
            .y_axis_label("speedup (x)")
            .legend(Legend::default())
            .show(ui, |p| {
                for c in &curves {
                    let i = rules.iter().position(|r| *r == c.rule).unwrap_or(0);
                    let color = PALETTE[i % PALETTE.len()];
                    let name = if c.ideal {
                        format!("{} (ideal)", c.rule)
                    } else {
                        c.rule.clone()
                    };
                    // Measured points are noisy on small models: markers only; the ideal
                    // curve is a line.
                    if c.ideal {
                        p.line(
                            Line::new(name.clone(), c.points.clone())
                                .color(color)
                                .style(LineStyle::dashed_loose()),
                        );
                    }
                    p.points(Points::new(name, c.points.clone()).color(color).radius(
                        if c.ideal && c.points.len() > 1 {
                            2.0
                        } else {
                            4.0
                        },
                    ));
                }
            });
        egui::ScrollArea::vertical().show(ui, |ui| {
            egui::Grid::new("sweep_rows").striped(true).show(ui, |ui| {
                for h in [
                    "split",
                    "rule",
                    "threshold",
                    "avg exit layer",
                    "agreement",
                    "ppl change",
                    "speedup",
                    "ideal",
                ] {
                    ui.strong(h);
                }
                ui.end_row();
                for row in r.rows.iter().chain(&r.chosen) {
                    ui.label(&row.split);
                    ui.label(&row.rule);
                    ui.label(format!("{:.3}", row.threshold));
                    ui.label(format!("{:.2}", row.avg_exit_layer));
                    ui.label(format!("{:.1}%", row.agreement * 100.0));
                    ui.label(format!("{:+.1}%", row.perplexity_change * 100.0));
                    ui.label(format!("{:.2}x", row.speedup));
                    ui.label(format!("{:.2}x", row.ideal_speedup));
                    ui.end_row();
                }
            });
        });
    }
}
