//! `exitgraph-gui [PIPELINE.ron]`: the desktop explorer, on the demo pipeline by default.

use exitgraph_gui::ExplorerApp;
use std::path::PathBuf;

fn main() -> eframe::Result {
    exitgraph::cpu::pin_thread_count();
    let pipeline = std::env::args_os().nth(1).map(PathBuf::from);
    let options = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("exitgraph explorer")
            .with_inner_size([1400.0, 900.0]),
        ..Default::default()
    };
    eframe::run_native(
        "exitgraph explorer",
        options,
        Box::new(move |_cc| {
            Ok(Box::new(match &pipeline {
                Some(p) => ExplorerApp::open(p),
                None => ExplorerApp::demo(),
            }))
        }),
    )
}
