// Command probes is the workload of `cargo xtask bench probes`: one timed
// phase per family of gopulse's BPF programs, each calling the probed
// runtime function over and over, so that the time a phase gains with the
// agent, over the probe hits the agent counted in it, is what one hit of
// that program costs. The protocol and the report are package harness's;
// each phase names the programs it measures.
//
// Every phase is deterministic in its operations (fixed keys, fixed
// counts); a map's hash seed is random, so where the runtime puts keys, and
// with it how often a churned swiss table prunes, varies a little from run
// to run. The harness reads the hits from the agent, not from here. Each
// phase is timed in 10 equal parts (see batches).
//
// -set picks the phases: growth (GC, stop-the-world and map growth, for an
// agent run with --map-assign-probes=off) or access (assignment, deletion
// and evacuation, for --map-assign-probes=always).
package main

import (
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"example.com/gopulse/bench/harness"
)

// Operation counts, sized so that on the development VM (one CPU, Go 1.27)
// each phase takes a second or two with the agent, and at least a few
// hundred milliseconds without it where the probed call is slow enough.
const (
	stwCount      = 100_000
	gcCount       = 10_000
	smallMapCount = 500_000
	growCount     = 5_000
	splitCount    = 300
	pruneOps      = 10_000_000
	assignOps     = 1_000_000
	evacCount     = 10_000
)

// Sinks keep maps reachable so they escape to the heap, as maps that outlive
// a call do: a non-escaping small map lives on the stack and never grows.
var (
	sink     [256]map[int64]int64
	accessed map[int64]int64
	memstats runtime.MemStats
)

// stw stops and starts the world n times, and nothing else:
// runtime.ReadMemStats is one stop-the-world with no GC.
//
//go:noinline
func stw(n int) {
	for i := 0; i < n; i++ {
		runtime.ReadMemStats(&memstats)
	}
}

// gc runs n whole GC cycles (each: two stops of the world, one mark
// termination) on a heap of next to nothing.
//
//go:noinline
func gc(n int) {
	for i := 0; i < n; i++ {
		runtime.GC()
	}
}

// nineEntries makes n maps without a size hint and puts 9 keys in each:
// exactly one growth per map, on the 9th insert (classic hashGrow: more than
// 8 entries in one bucket; swiss growToTable: the first group of 8 is full).
//
//go:noinline
func nineEntries(keys []int64, n int) {
	for i := 0; i < n; i++ {
		m := make(map[int64]int64)
		for j, k := range keys[:9] {
			m[k] = int64(j)
		}
		sink[i%len(sink)] = m
	}
}

// fill makes n maps with a size hint of hint and fills each with keys.
// Swiss, a hint of 9 is one table of 16 slots, so filling it to 896 keys
// grows that table 6 times (16 to 1024 slots) and nothing else; a hint of
// 896 is one table of 1024 slots (the most a table holds), so filling it
// further only splits tables. Go 1.25+ calls pruneTombstones (nothing to
// prune here) before every grow and split, which the agent does not probe
// where it can probe past that function's early return.
//
//go:noinline
func fill(keys []int64, hint, n int) {
	for i := 0; i < n; i++ {
		m := make(map[int64]int64, hint)
		for j, k := range keys {
			m[k] = int64(j)
		}
		sink[i%len(sink)] = m
	}
}

// The churned table: a size hint of 40 is one table of 64 slots, of which
// 56 may be used before it must grow or prune; pruneLive keys stay in it.
// Of the sizes tried (16 to 256 slots, live keys from half to all of what
// they may hold) this one pruned most often, about once every 150 steps,
// and never grew.
const (
	pruneHint = 40
	pruneLive = 36
)

// churn keeps one swiss table at pruneLive keys, n times deleting the
// oldest key and inserting a new one: a delete from a group without a free
// slot leaves a tombstone, inserts use up the free slots, and once none is
// left the runtime prunes the tombstones (pruneTombstones) rather than grow.
// Most steps reuse a tombstone instead, so prunes stay rare: the runtime
// makes them so.
//
//go:noinline
func churn(keys []int64, n int) {
	m := make(map[int64]int64, pruneHint)
	for i := 0; i < pruneLive; i++ {
		m[keys[i]] = 0
	}
	for i := pruneLive; i < n+pruneLive; i++ {
		delete(m, keys[(i-pruneLive)%len(keys)])
		m[keys[i%len(keys)]] = int64(i)
	}
	accessed = m
}

// assign overwrites the keys of a map that already holds them, n times in
// all: one mapassign each, no growth.
//
//go:noinline
func assign(m map[int64]int64, keys []int64, n int) {
	mask := len(keys) - 1
	for i := 0; i < n; i++ {
		m[keys[i&mask]] = int64(i)
	}
}

// deleteAbsent deletes keys a map does not hold, n times in all: one
// mapdelete each, the map unchanged.
//
//go:noinline
func deleteAbsent(m map[int64]int64, keys []int64, n int) {
	mask := len(keys) - 1
	for i := 0; i < n; i++ {
		delete(m, keys[i&mask])
	}
}

// evacuate makes n classic maps sized for 52 entries (8 buckets), fills
// each, inserts a 53rd key (hashGrow: 16 buckets), then deletes 8 keys the
// map lacks: every write to a growing map evacuates up to two old buckets,
// so the growth completes within them. Per map: 53 assignments, 8
// deletions, one growth and 8 to 16 evacuate calls.
//
//go:noinline
func evacuate(keys, absent []int64, n int) {
	for i := 0; i < n; i++ {
		m := make(map[int64]int64, 52)
		for j, k := range keys[:53] {
			m[k] = int64(j)
		}
		for _, k := range absent[:8] {
			delete(m, k)
		}
		sink[i%len(sink)] = m
	}
}

// goMinor is the minor version of the Go release that built this program
// (1.27.3: 27), or 0 for a development build.
func goMinor() int {
	v := strings.TrimPrefix(runtime.Version(), "go1.")
	end := strings.IndexFunc(v, func(r rune) bool { return r < '0' || r > '9' })
	if end >= 0 {
		v = v[:end]
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0
	}
	return n
}

// batches is how many parts each phase is timed in; the harness reads the
// fastest part's ns/op.
const batches = 10

func phases(set string, scale float64) []harness.Phase {
	keys := harness.Keys(1 << 14)
	// Swiss tables from Go 1.24 on (the harness builds no
	// GOEXPERIMENT=noswissmap binaries); pruneTombstones from 1.25.
	minor := goMinor()
	swiss := minor >= 24
	var ps []harness.Phase
	// add makes a phase of count operations (scaled) in batches parts of n
	// operations each, run(n) doing one part.
	add := func(name string, count int, probes []string, run func(n int)) {
		n := harness.Scaled(count, scale) / batches
		if n < 1 {
			n = 1
		}
		ps = append(ps, harness.Phase{
			Name: name, Ops: int64(n * batches), Probes: probes, Batches: batches,
			Run: func() { run(n) },
		})
	}
	switch set {
	case "growth":
		// stw_stop: Go 1.21 only (later releases pass the stop to
		// startTheWorldWithSema, and gopulse probes that alone).
		add("stw", stwCount, []string{"stw_stop", "stw_start_entry", "stw_start_ret"}, stw)
		add("gc", gcCount, []string{"gc_mark_termination"}, gc)
		nine := func(n int) { nineEntries(keys, n) }
		if !swiss {
			add("grow_classic", smallMapCount, []string{"grow_classic"}, nine)
			break
		}
		add("grow_to_table", smallMapCount, []string{"grow_to_table"}, nine)
		if minor >= 25 {
			// The agent probes pruneTombstones past its early return
			// (prune_body) where it finds that spot, else at the entry.
			add("prune", pruneOps, []string{"prune_body", "prune_table"},
				func(n int) { churn(keys, n) })
		}
		add("grow_table", growCount, []string{"grow_table"},
			func(n int) { fill(keys[:896], 9, n) })
		add("split_table", splitCount, []string{"split_table"},
			func(n int) { fill(keys, 896, n) })
	case "access":
		// Built before anything is timed, and before the agent attaches.
		present, absent := keys[:1024], keys[1024:2048]
		m := make(map[int64]int64, len(present))
		for i, k := range present {
			m[k] = int64(i)
		}
		accessed = m
		add("map_assign", assignOps, []string{"map_assign"},
			func(n int) { assign(m, present, n) })
		add("map_delete", assignOps, []string{"map_delete"},
			func(n int) { deleteAbsent(m, absent, n) })
		if !swiss {
			add("map_evacuate", evacCount, []string{"map_evacuate"},
				func(n int) { evacuate(keys, absent, n) })
		}
	default:
		fmt.Fprintf(os.Stderr, "probes: -set %q: growth or access\n", set)
		os.Exit(2)
	}
	return ps
}

func main() {
	set := flag.String("set", "growth", "growth (GC, stop-the-world, map growth) or access (assignment, deletion, evacuation)")
	harness.Main("probes", func(scale float64) []harness.Phase { return phases(*set, scale) })
}
