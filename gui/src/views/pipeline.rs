//! Pipeline editor: the RON pipeline with syntax colouring, the first error shown at its line
//! and column while typing, Apply to recompile, open and save (atomically).

use crate::pipeline_check::{check, offset_of, TextError};
use crate::ron_highlight::{tokenize, TokenKind};
use eframe::egui::{self, text::LayoutJob, Color32, FontId, RichText, TextFormat, Ui};
use std::path::PathBuf;

pub struct PipelineEditor {
    /// The file being edited (new files are saved here too).
    pub path: PathBuf,
    /// The path field of Open / Save as.
    pub path_field: String,
    pub text: String,
    /// The text as last opened or saved.
    pub saved: String,
    /// The first error of `text`, kept up to date as it changes.
    pub error: Option<TextError>,
    checked: String,
    /// The last file or compile message.
    pub message: Option<(bool, String)>,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditorAction {
    None,
    Apply,
}

impl PipelineEditor {
    pub fn new(path: PathBuf, text: String) -> Self {
        let mut e = PipelineEditor {
            path_field: path.display().to_string(),
            path,
            saved: text.clone(),
            text,
            error: None,
            checked: String::new(),
            message: None,
        };
        e.recheck();
        e
    }

    /// Re-parses the text when it changed.
    pub fn recheck(&mut self) {
        if self.checked != self.text {
            self.error = check(&self.text, &self.path).err();
            self.checked = self.text.clone();
        }
    }

    pub fn dirty(&self) -> bool {
        self.text != self.saved
    }

    pub fn open(&mut self, path: PathBuf) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                self.message = Some((true, format!("opened {}", path.display())));
                self.path_field = path.display().to_string();
                self.path = path;
                self.saved = text.clone();
                self.text = text;
                self.recheck();
            }
            Err(e) => self.message = Some((false, format!("{}: {e}", path.display()))),
        }
    }

    pub fn save_to(&mut self, path: PathBuf) {
        match exitgraph::atomic::write_text(&path, &self.text) {
            Ok(()) => {
                self.message = Some((true, format!("saved {}", path.display())));
                self.path_field = path.display().to_string();
                self.path = path;
                self.saved = self.text.clone();
                self.recheck();
            }
            Err(e) => self.message = Some((false, format!("{e:#}"))),
        }
    }

    pub fn show(&mut self, ui: &mut Ui) -> EditorAction {
        self.recheck();
        let mut action = EditorAction::None;
        ui.horizontal(|ui| {
            let can_apply = self.error.is_none();
            if ui
                .add_enabled(can_apply, egui::Button::new("Apply"))
                .on_hover_text("Recompile the pipeline and refresh every view (ctrl + enter)")
                .clicked()
            {
                action = EditorAction::Apply;
            }
            ui.separator();
            let file = ui.label("File");
            ui.add(egui::TextEdit::singleline(&mut self.path_field).desired_width(360.0))
                .labelled_by(file.id);
            if ui.button("Open").clicked() {
                self.open(PathBuf::from(self.path_field.trim()));
            }
            if ui.button("Save").clicked() {
                let p = self.path.clone();
                self.save_to(p);
            }
            if ui.button("Save as").clicked() {
                self.save_to(PathBuf::from(self.path_field.trim()));
            }
            if self.dirty() {
                ui.weak("(unsaved changes)");
            }
        });
        match &self.error {
            Some(e) => {
                ui.colored_label(ui.visuals().error_fg_color, format!("error at {e}"));
            }
            None => {
                ui.colored_label(Color32::from_rgb(46, 125, 50), "pipeline parses");
            }
        }
        if let Some((ok, m)) = &self.message {
            let color = if *ok {
                ui.visuals().weak_text_color()
            } else {
                ui.visuals().error_fg_color
            };
            ui.label(RichText::new(m).color(color));
        }
        ui.separator();
        let error_at = self
            .error
            .as_ref()
            .and_then(|e| (e.line > 0).then(|| offset_of(&self.text, e.line, e.column)));
        let dark = ui.visuals().dark_mode;
        let mut layouter = |ui: &Ui, buf: &dyn egui::TextBuffer, wrap: f32| {
            let mut job = highlight(buf.as_str(), error_at, dark);
            job.wrap.max_width = wrap;
            ui.fonts_mut(|f| f.layout_job(job))
        };
        let lines = self.text.split('\n').count().max(1);
        // The line the underline is on (RON may point at the end of the line before).
        let error_line = error_at.map_or(0, |at| {
            let (start, _) = error_span(&self.text, at);
            self.text[..start].matches('\n').count() + 1
        });
        let response = egui::ScrollArea::vertical()
            .show(ui, |ui| {
                ui.horizontal_top(|ui| {
                    // Line numbers, the error's in red.
                    let mut gutter = LayoutJob::default();
                    for n in 1..=lines {
                        let color = if n == error_line {
                            Color32::from_rgb(229, 57, 53)
                        } else {
                            ui.visuals().weak_text_color()
                        };
                        let sep = if n < lines { "\n" } else { "" };
                        gutter.append(
                            &format!("{n:>3}{sep}"),
                            0.0,
                            TextFormat::simple(FontId::monospace(13.0), color),
                        );
                    }
                    ui.add_space(2.0);
                    ui.vertical(|ui| {
                        ui.add_space(2.0);
                        ui.add(egui::Label::new(gutter).selectable(false));
                    });
                    ui.add(
                        egui::TextEdit::multiline(&mut self.text)
                            .code_editor()
                            .desired_width(f32::INFINITY)
                            .desired_rows(30)
                            .layouter(&mut layouter),
                    )
                })
                .inner
            })
            .inner;
        let response = response.on_hover_text("Pipeline RON");
        if response.changed() {
            self.recheck();
        }
        if response.has_focus()
            && ui.input(|i| i.key_pressed(egui::Key::Enter) && i.modifiers.command)
            && self.error.is_none()
        {
            action = EditorAction::Apply;
        }
        action
    }
}

/// The text to underline for an error at byte `at`: from the next non-blank character
/// (RON points just past the last good token) to the end of its line; the last character
/// when only blanks follow.
pub fn error_span(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let start = match text[at..].find(|c: char| !c.is_whitespace()) {
        Some(i) => at + i,
        None => text.trim_end().char_indices().last().map_or(0, |(i, _)| i),
    };
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let first_char_end = text[start..]
        .chars()
        .next()
        .map_or(start, |c| start + c.len_utf8());
    (start, line_end.max(first_char_end))
}

/// Coloured RON; the character at `error_at` (byte offset) and the rest of its line are
/// underlined in red.
pub fn highlight(text: &str, error_at: Option<usize>, dark: bool) -> LayoutJob {
    let mut job = LayoutJob::default();
    let font = FontId::monospace(13.0);
    let color = |k: TokenKind| -> Color32 {
        match (k, dark) {
            (TokenKind::Comment, _) => Color32::from_rgb(120, 130, 120),
            (TokenKind::String, true) => Color32::from_rgb(206, 145, 120),
            (TokenKind::String, false) => Color32::from_rgb(163, 21, 21),
            (TokenKind::Number, true) => Color32::from_rgb(181, 206, 168),
            (TokenKind::Number, false) => Color32::from_rgb(9, 134, 88),
            (TokenKind::TypeName, true) => Color32::from_rgb(78, 201, 176),
            (TokenKind::TypeName, false) => Color32::from_rgb(38, 127, 153),
            (TokenKind::Field, true) => Color32::from_rgb(156, 220, 254),
            (TokenKind::Field, false) => Color32::from_rgb(0, 16, 128),
            (_, true) => Color32::from_rgb(212, 212, 212),
            (_, false) => Color32::from_rgb(40, 40, 40),
        }
    };
    let error_span = error_at.map(|at| error_span(text, at));
    for (range, kind) in tokenize(text) {
        // Split the token where the error span starts and ends.
        let mut cuts = vec![range.start, range.end];
        if let Some((a, b)) = error_span {
            for c in [a, b] {
                if c > range.start && c < range.end && text.is_char_boundary(c) {
                    cuts.push(c);
                }
            }
        }
        cuts.sort_unstable();
        for w in cuts.windows(2) {
            let (s, e) = (w[0], w[1]);
            if s == e {
                continue;
            }
            let in_error = error_span.is_some_and(|(a, b)| s >= a && s < b);
            let mut format = TextFormat::simple(font.clone(), color(kind));
            if in_error {
                format.underline = egui::Stroke::new(2.0, Color32::from_rgb(229, 57, 53));
                format.background = Color32::from_rgba_unmultiplied(229, 57, 53, 40);
            }
            job.append(&text[s..e], 0.0, format);
        }
    }
    job
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn highlighting_keeps_the_text_and_marks_the_error() {
        let text = "Pipeline(\n  passes: [X(keep: 3],\n)";
        let at = offset_of(text, 2, 21);
        let job = highlight(text, Some(at), true);
        assert_eq!(job.text, text);
        let marked: String = job
            .sections
            .iter()
            .filter(|s| s.format.underline.width > 0.0)
            .map(|s| &job.text[s.byte_range.start.0..s.byte_range.end.0])
            .collect();
        assert_eq!(marked, "],");
    }

    #[test]
    fn an_error_at_a_line_end_marks_what_follows() {
        let text = "Pipeline(\n)\n\noops é\n";
        // RON points just past `)`.
        let at = offset_of(text, 2, 2);
        let (a, b) = error_span(text, at);
        assert_eq!(&text[a..b], "oops é");
        // Nothing after: the last character.
        let (a, b) = error_span("Pipeline(\n  ", 12);
        assert_eq!(&"Pipeline(\n  "[a..b], "(");
        assert_eq!(error_span("", 0), (0, 0));
    }

    #[test]
    fn editing_rechecks_and_saving_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.ron");
        let mut e = PipelineEditor::new(path.clone(), "Pipeline(passes: [])".into());
        assert!(e.error.is_none());
        e.text = "Pipeline(passes: [".into();
        e.recheck();
        assert_eq!(e.error.as_ref().unwrap().line, 1);
        e.text = "Pipeline(passes: [])\n".into();
        e.recheck();
        assert!(e.dirty());
        e.save_to(path.clone());
        assert!(!e.dirty());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "Pipeline(passes: [])\n"
        );
        // Only the file itself is left: the temporary was renamed.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut other = PipelineEditor::new(dir.path().join("q.ron"), String::new());
        other.open(path);
        assert_eq!(other.text, "Pipeline(passes: [])\n");
        other.open(dir.path().join("missing.ron"));
        assert!(matches!(other.message, Some((false, _))));
    }
}
