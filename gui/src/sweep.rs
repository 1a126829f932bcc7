//! The speed/quality sweep of `exitgraph eval exits --json`, as plot series.

use exitgraph::eval::exits::ExitReport;
use std::path::Path;

/// One curve: a rule's settings as (agreement %, speedup) points, measured or ideal.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepSeries {
    pub rule: String,
    pub ideal: bool,
    pub points: Vec<[f64; 2]>,
}

/// Reads a report written by `eval exits --json`.
pub fn load(path: &Path) -> anyhow::Result<ExitReport> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}:{}: not an `eval exits --json` report: {e}",
            path.display(),
            e.line(),
            e.column()
        )
    })
}

/// The sweep rows (all cases) as a measured and an ideal curve per rule, sorted by agreement.
pub fn series(report: &ExitReport) -> Vec<SweepSeries> {
    let mut out: Vec<SweepSeries> = Vec::new();
    for r in report.rows.iter().filter(|r| r.split == "all") {
        for (ideal, y) in [(false, r.speedup), (true, r.ideal_speedup)] {
            let p = [r.agreement * 100.0, y];
            match out
                .iter_mut()
                .find(|s| s.rule == r.rule && s.ideal == ideal)
            {
                Some(s) => s.points.push(p),
                None => out.push(SweepSeries {
                    rule: r.rule.clone(),
                    ideal,
                    points: vec![p],
                }),
            }
        }
    }
    for s in &mut out {
        s.points.sort_by(|a, b| a[0].total_cmp(&b[0]));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use exitgraph::eval::exits::SweepRow;

    fn row(rule: &str, split: &str, agreement: f64, speedup: f64) -> SweepRow {
        SweepRow {
            split: split.into(),
            rule: rule.into(),
            threshold: 0.5,
            avg_exit_layer: 3.0,
            exit_share: vec![(6, 1.0)],
            agreement,
            perplexity: 2.0,
            perplexity_change: 0.1,
            tokens_per_s: 100.0,
            speedup,
            ideal_speedup: speedup + 0.1,
            ..SweepRow::default()
        }
    }

    #[test]
    fn rows_become_sorted_curves_per_rule() {
        let report = ExitReport {
            layers: 6,
            exits: vec![2, 4],
            cases: 10,
            batch: 1,
            full_tokens_per_s: 100.0,
            full_perplexity: 2.0,
            rows: vec![
                row("confidence", "all", 0.9, 1.5),
                row("confidence", "all", 0.8, 1.7),
                row("entropy", "all", 0.99, 1.1),
                row("entropy", "held-out", 0.5, 9.0),
            ],
            chosen: Vec::new(),
            ..ExitReport::default()
        };
        let s = series(&report);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].rule, "confidence");
        assert!(!s[0].ideal);
        assert_eq!(s[0].points, vec![[80.0, 1.7], [90.0, 1.5]]);
        assert!(s[1].ideal);
        assert_eq!(s[2].points.len(), 1, "held-out rows are not curves");
    }

    #[test]
    fn a_bad_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        std::fs::write(&p, "{\"layers\": 6").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("r.json"));
        assert!(load(&dir.path().join("missing.json")).is_err());
    }
}
