//! `cargo ktstr stats [RUN]`: one table per test of the last (or a named)
//! run's artifacts; `--compare A B`: kernel B against kernel A.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::stats::aggregate::{self, Selection, Table};
use crate::stats::{compare, load, render};

const EXAMPLES: &str = "\
Examples:
  cargo ktstr stats                                   # the newest run: one table per test, rows = kernels
  cargo ktstr stats --compare 6.12.117 deb12          # B = deb12 vs A = 6.12.117, per test and figure
  cargo ktstr stats 0590bdd1-4bdc-479e-ab1e-764946690f6f --metric wake_p99_us --metric max_gap_ms
  cargo ktstr stats --metric 'a[*].iterations'        # per-worker figures
  cargo ktstr stats --json | jq '.tests[].rows[].metrics'

Run the tests with `cargo ktstr test --repeat N` to get the run-to-run noise:
cells then show the median ±spread, and --compare flags the differences beyond it.
The --json shape is described in docs/stats.md.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct StatsArgs {
    /// The run: its id (a directory under the artifacts root) or a path to
    /// one; default: the run with the newest result.json.
    pub run: Option<String>,
    /// Print JSON (every figure unless --metric narrows them) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Compare kernel B against kernel A (labels as in the test names or result.json, or a unique part of one).
    #[arg(long, num_args = 2, value_names = ["LABEL_A", "LABEL_B"])]
    pub compare: Option<Vec<String>>,
    /// Figures to show (repeatable, comma-separated): a field of every group
    /// (`wake_p99_us`), a key with `*` wildcards (`a[*].iterations`), or `all`.
    #[arg(long = "metric", value_name = "NAME")]
    pub metrics: Vec<String>,
    /// Only tests whose name contains this (repeatable).
    #[arg(short = 't', long = "test", value_name = "SUBSTRING")]
    pub tests: Vec<String>,
    /// The artifacts root (default: $KTSTR_ARTIFACT_DIR, else {cargo target dir}/ktstr).
    #[arg(long, value_name = "DIR")]
    pub artifact_dir: Option<PathBuf>,
}

/// Terminal width for the tables: `$COLUMNS`, else 120.
fn width() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|&w| w >= 40).unwrap_or(120)
}

pub fn run(args: StatsArgs) -> Result<i32> {
    let root = load::artifacts_root(args.artifact_dir.as_deref())?;
    let run_dir = load::pick_run(&root, args.run.as_deref())?;
    let run_id = run_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut entries = load::load_run(&run_dir)?;
    if !args.tests.is_empty() {
        entries.retain(|e| args.tests.iter().any(|t| e.test.contains(t.as_str())));
    }
    if entries.is_empty() {
        bail!("no result.json in {} matches the given --test filters", run_dir.display());
    }
    // JSON carries every figure unless --metric narrows them.
    let sel = match Selection::from_args(&args.metrics) {
        Selection::Default if args.json && args.compare.is_none() => Selection::All,
        s => s,
    };
    let tables: Vec<Table> = load::by_test(&entries).iter().map(|(t, es)| aggregate::table(t, es, &sel)).collect();
    let dir = run_dir.display().to_string();
    let Some(pair) = &args.compare else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&render::tables_json(&run_id, &dir, &tables))?);
        } else {
            print!("{}", render::tables_text(&run_id, &tables, width()));
        }
        return Ok(0);
    };
    let mut labels: Vec<String> = entries.iter().map(|e| e.kernel.clone()).collect();
    labels.sort();
    labels.dedup();
    let a = compare::resolve_label(&pair[0], &labels)?;
    let b = compare::resolve_label(&pair[1], &labels)?;
    if a == b {
        bail!("--compare {} {}: both name kernel {a}; give two different kernels", pair[0], pair[1]);
    }
    let field_of = |key: &str| {
        entries.iter().flat_map(|e| &e.figures).find(|f| f.key == key).map(|f| f.field.clone()).unwrap_or_default()
    };
    let diffs: Vec<compare::TestDiff> = tables.iter().flat_map(|t| compare::compare_table(t, &a, &b, &field_of)).collect();
    if diffs.is_empty() {
        bail!("no test in {} ran on both {a} and {b}", run_dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&render::compare_json(&run_id, &dir, &a, &b, &diffs))?);
    } else {
        print!("{}", render::compare_text(&run_id, &a, &b, &diffs, width()));
    }
    Ok(0)
}
