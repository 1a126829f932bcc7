//! Background work with progress: the UI thread polls, never waits.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Progress a job reports: a fraction (0 to 1) and what it is doing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub fraction: f32,
    pub message: String,
}

/// The job's handle on its progress; reporting wakes the UI.
#[derive(Clone)]
pub struct Reporter {
    progress: Arc<Mutex<Progress>>,
    wake: Option<eframe::egui::Context>,
}

impl Reporter {
    pub fn set(&self, fraction: f32, message: impl Into<String>) {
        if let Ok(mut p) = self.progress.lock() {
            p.fraction = fraction.clamp(0.0, 1.0);
            p.message = message.into();
        }
        if let Some(ctx) = &self.wake {
            ctx.request_repaint();
        }
    }
}

/// A job running on its own thread.
pub struct Job<T> {
    progress: Arc<Mutex<Progress>>,
    rx: mpsc::Receiver<anyhow::Result<T>>,
}

impl<T: Send + 'static> Job<T> {
    /// Starts `work` on a new thread; `wake` is repainted when it reports or finishes.
    pub fn spawn(
        wake: Option<eframe::egui::Context>,
        work: impl FnOnce(&Reporter) -> anyhow::Result<T> + Send + 'static,
    ) -> Self {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let reporter = Reporter {
            progress: progress.clone(),
            wake,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let result = work(&reporter);
            let _ = tx.send(result);
            if let Some(ctx) = &reporter.wake {
                ctx.request_repaint();
            }
        });
        Job { progress, rx }
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// The result once the job has finished (`None` while it runs). An error is a message.
    pub fn poll(&self) -> Option<Result<T, String>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r.map_err(|e| format!("{e:#}"))),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err("the background job stopped unexpectedly".to_string()))
            }
        }
    }

    /// Waits for the result (tests and headless use).
    pub fn wait(self) -> Result<T, String> {
        match self.rx.recv() {
            Ok(r) => r.map_err(|e| format!("{e:#}")),
            Err(_) => Err("the background job stopped unexpectedly".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_job_reports_and_finishes() {
        let job = Job::spawn(None, |r| {
            r.set(0.5, "half");
            Ok(7)
        });
        assert_eq!(job.wait(), Ok(7));
    }

    #[test]
    fn errors_and_panics_become_messages() {
        let job: Job<()> = Job::spawn(None, |_| anyhow::bail!("no"));
        assert_eq!(job.wait(), Err("no".to_string()));
        let job: Job<()> = Job::spawn(None, |_| {
            let v: Vec<u8> = Vec::new();
            let _ = v[1];
            Ok(())
        });
        assert!(job.wait().is_err());
    }
}
