//! Go's stop-the-world reasons (`runtime.stwReason`) as metric label values.
use crate::inspect::GoVersion;

/// One reason: Go's own string (`stwReasonStrings`) and our label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason {
    pub go_name: &'static str,
    pub label: &'static str,
}

const fn r(go_name: &'static str, label: &'static str) -> Reason {
    Reason { go_name, label }
}

/// `stwReasonStrings` of Go 1.21 through 1.27 (identical in all of them;
/// the integration tests compare this table with each toolchain's source).
pub const REASONS_GO121: &[Reason] = &[
    r("unknown", "unknown"),
    r("GC mark termination", "gc_mark_termination"),
    r("GC sweep termination", "gc_sweep_termination"),
    r("write heap dump", "write_heap_dump"),
    r("goroutine profile", "goroutine_profile"),
    r("goroutine profile cleanup", "goroutine_profile_cleanup"),
    r("all goroutines stack trace", "all_goroutines_stack_trace"),
    r("read mem stats", "read_mem_stats"),
    r("AllThreadsSyscall", "all_threads_syscall"),
    r("GOMAXPROCS", "gomaxprocs"),
    r("start trace", "start_trace"),
    r("stop trace", "stop_trace"),
    r("CountPagesInUse (test)", "count_pages_in_use_test"),
    r("ReadMetricsSlow (test)", "read_metrics_slow_test"),
    r("ReadMemStatsSlow (test)", "read_mem_stats_slow_test"),
    r(
        "PageCachePagesLeaked (test)",
        "page_cache_pages_leaked_test",
    ),
    r("ResetDebugLog (test)", "reset_debug_log_test"),
];

/// Go's `stwGCMarkTerm` and `stwGCSweepTerm`, in every supported release.
pub const GC_MARK_TERM: u8 = 1;
pub const GC_SWEEP_TERM: u8 = 2;

/// The reason table of a release.
pub fn table_for(_version: &GoVersion) -> &'static [Reason] {
    // Every supported release (1.21–1.27) shares one table. A release that
    // renumbers reasons gets its own table here.
    REASONS_GO121
}

/// Label for a raw reason value; values a release does not define become
/// `reason_<n>`, so cardinality stays bounded at 256.
pub fn label(table: &[Reason], value: u8) -> String {
    match table.get(usize::from(value)) {
        Some(reason) => reason.label.to_owned(),
        None => format!("reason_{value}"),
    }
}

/// Our snake_case label for one of Go's reason strings (how the table's
/// labels were made; the test keeps them consistent).
#[cfg(test)]
fn snake_case(go_name: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = go_name.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_alphanumeric() {
            // A capital starts a word when it follows a lowercase letter or
            // begins a capitalised word inside an acronym run ("AllThreads").
            let starts_word = c.is_ascii_uppercase()
                && i > 0
                && (chars[i - 1].is_ascii_lowercase()
                    || (chars[i - 1].is_ascii_uppercase()
                        && chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase())));
            if starts_word && !out.ends_with('_') && !out.is_empty() {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_snake_case_of_go_names() {
        for reason in REASONS_GO121 {
            assert_eq!(snake_case(reason.go_name), reason.label, "{reason:?}");
        }
    }

    #[test]
    fn gc_reasons_have_fixed_values() {
        assert_eq!(
            REASONS_GO121[usize::from(GC_MARK_TERM)].label,
            "gc_mark_termination"
        );
        assert_eq!(
            REASONS_GO121[usize::from(GC_SWEEP_TERM)].label,
            "gc_sweep_termination"
        );
        assert_eq!(REASONS_GO121[7].label, "read_mem_stats");
        assert_eq!(REASONS_GO121[9].label, "gomaxprocs");
        assert_eq!(REASONS_GO121[4].label, "goroutine_profile");
    }

    #[test]
    fn every_release_has_a_table() {
        for minor in 21..=27 {
            let v = GoVersion::parse(&format!("go1.{minor}.1")).unwrap();
            assert_eq!(table_for(&v).len(), 17);
        }
    }

    #[test]
    fn unknown_values_are_bounded() {
        assert_eq!(label(REASONS_GO121, 7), "read_mem_stats");
        assert_eq!(label(REASONS_GO121, 17), "reason_17");
        assert_eq!(label(REASONS_GO121, 255), "reason_255");
    }
}
