//! The explorer: a tab per view over one compiled pipeline.

use crate::compute_path::{iterations, path};
use crate::loaded::Loaded;
use crate::pipeline_check::check;
use crate::views::exits::ExitsView;
use crate::views::graph::{GraphView, PathHighlight};
use crate::views::pipeline::{EditorAction, PipelineEditor};
use crate::views::run::{RunAction, RunView};
use crate::views::sim::{examples_dir, SimView};
use eframe::egui::{self, RichText, Ui};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    Graph,
    Pipeline,
    Run,
    Simulator,
    Exits,
}

pub struct ExplorerApp {
    pub tab: Tab,
    pub editor: PipelineEditor,
    pub loaded: Option<Loaded>,
    pub compile_error: Option<String>,
    pub graph: GraphView,
    pub run: RunView,
    pub sim: SimView,
    pub exits: ExitsView,
}

/// The demo pipeline of the repository.
pub fn demo_pipeline_path() -> PathBuf {
    examples_dir().join("demo.ron")
}

impl ExplorerApp {
    /// Opens a pipeline file and compiles it; problems show in the UI.
    pub fn open(path: &Path) -> Self {
        let mut editor = PipelineEditor::new(path.to_path_buf(), String::new());
        editor.open(path.to_path_buf());
        let mut app = ExplorerApp {
            tab: Tab::Graph,
            editor,
            loaded: None,
            compile_error: None,
            graph: GraphView::default(),
            run: RunView::default(),
            sim: SimView::default(),
            exits: ExitsView::default(),
        };
        if matches!(app.editor.message, Some((false, _))) {
            app.compile_error = app.editor.message.as_ref().map(|m| m.1.clone());
            app.tab = Tab::Pipeline;
        } else {
            app.apply();
        }
        app
    }

    /// The demo pipeline (`examples/demo.ron`).
    pub fn demo() -> Self {
        Self::open(&demo_pipeline_path())
    }

    /// Recompiles the editor's pipeline and refreshes every view.
    pub fn apply(&mut self) {
        let pipeline = match check(&self.editor.text, &self.editor.path) {
            Ok(p) => p,
            Err(e) => {
                self.compile_error = Some(format!("{}: {e}", self.editor.path.display()));
                self.tab = Tab::Pipeline;
                return;
            }
        };
        match Loaded::compile(&pipeline, &self.editor.path) {
            Ok(l) => {
                self.compile_error = None;
                self.graph.reset(Some(&l));
                self.run.result = None;
                self.run.selected = None;
                self.editor.message = Some((
                    true,
                    format!(
                        "compiled: {} nodes after {} passes",
                        l.after.graph.node_count(),
                        l.passes.len()
                    ),
                ));
                self.loaded = Some(l);
            }
            Err(e) => {
                self.compile_error = Some(format!("{e:#}"));
                self.editor.message = Some((false, format!("{e:#}")));
            }
        }
    }

    /// Outlines the compute path of heatmap row `row` on the compiled graph.
    pub fn show_token_path(&mut self, row: usize) {
        let (Some(l), Some(r)) = (&self.loaded, &self.run.result) else {
            return;
        };
        let Some(t) = r.heatmap.rows.get(row) else {
            return;
        };
        self.graph.path = Some(PathHighlight {
            label: format!(
                "token {:?} (prompt {}, position {})",
                t.text,
                t.seq + 1,
                t.pos
            ),
            nodes: path(&l.after, &t.layers, t.exit_layer),
            iterations: iterations(&l.after, &t.layers),
        });
    }

    /// The whole UI.
    pub fn show(&mut self, ui: &mut Ui) {
        self.run.poll(self.loaded.as_ref());
        self.sim.poll();
        if self.run.running() || self.sim.running() {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
        }
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.strong("exitgraph explorer");
                ui.separator();
                for (tab, name) in [
                    (Tab::Graph, "Graph"),
                    (Tab::Pipeline, "Pipeline"),
                    (Tab::Run, "Run"),
                    (Tab::Simulator, "Simulator"),
                    (Tab::Exits, "Exits"),
                ] {
                    ui.selectable_value(&mut self.tab, tab, name);
                }
                ui.separator();
                let file = self
                    .editor
                    .path
                    .file_name()
                    .map_or_else(String::new, |f| f.to_string_lossy().to_string());
                let mut status = file;
                if let Some(l) = &self.loaded {
                    status.push_str(&format!(
                        " · {} ({} layers, {} parameters)",
                        l.model_dir
                            .file_name()
                            .map_or_else(String::new, |f| f.to_string_lossy().to_string()),
                        l.depth(),
                        exitgraph::inspect::human(l.after.params() as f64)
                    ));
                }
                if self.editor.dirty() {
                    status.push_str(" · unsaved");
                }
                ui.weak(status);
            });
            if let Some(e) = &self.compile_error {
                ui.colored_label(ui.visuals().error_fg_color, RichText::new(e));
            }
        });
        egui::CentralPanel::default().show(ui, |ui| match self.tab {
            Tab::Graph => self.graph.show(ui, self.loaded.as_ref()),
            Tab::Pipeline => {
                if self.editor.show(ui) == EditorAction::Apply {
                    self.apply();
                }
            }
            Tab::Run => match self.run.show(ui, self.loaded.as_ref()) {
                RunAction::ShowPath(row) => self.show_token_path(row),
                RunAction::OpenGraph => self.tab = Tab::Graph,
                RunAction::None => {}
            },
            Tab::Simulator => self.sim.show(ui, self.loaded.as_ref()),
            Tab::Exits => self.exits.show(ui),
        });
    }
}

impl eframe::App for ExplorerApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_demo_opens_compiled_on_the_graph() {
        let app = ExplorerApp::demo();
        assert_eq!(app.tab, Tab::Graph);
        assert!(app.compile_error.is_none());
        assert_eq!(app.loaded.as_ref().unwrap().depth(), 8);
    }

    #[test]
    fn a_missing_or_broken_file_opens_the_editor_with_the_error() {
        let app = ExplorerApp::open(Path::new("no-such-pipeline.ron"));
        assert_eq!(app.tab, Tab::Pipeline);
        assert!(app.loaded.is_none());
        assert!(app.compile_error.unwrap().contains("no-such-pipeline.ron"));

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.ron");
        std::fs::write(&p, "Pipeline(passes: [").unwrap();
        let app = ExplorerApp::open(&p);
        assert_eq!(app.tab, Tab::Pipeline);
        assert!(app.loaded.is_none());
        assert_eq!(app.editor.error.as_ref().unwrap().line, 1);
    }
}
