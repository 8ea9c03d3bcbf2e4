// Command overhead is the workload of `cargo xtask bench overhead`: map
// inserts and deletes, and appends, in phases, each timed on its own, so the cost of
// gopulse's probes can be read per kind of map traffic. The protocol and
// the report are package harness's.
//
// Everything is deterministic: fixed keys, fixed operation counts, a
// runtime.GC() before each phase (outside the timing) so every phase starts
// from the same heap.
package main

import (
	"fmt"

	"example.com/gopulse/bench/harness"
)

// Sinks keep maps reachable so they escape to the heap, as maps that outlive
// a call do: a non-escaping small map lives on the stack and never grows.
var (
	smallSink [1024]map[int]int
	intSink   map[int64]int64
	strSink   map[string]int64
	growSink  map[int64]int64
	stormSink [1024]map[int64]int64

	appendIntSink []int64
	appendStrSink []string
)

// strKeys turns int keys into 20-byte strings, made before anything is timed.
func strKeys(ints []int64) []string {
	out := make([]string, len(ints))
	for i, k := range ints {
		out[i] = fmt.Sprintf("key-%016x", uint64(k))
	}
	return out
}

// smallMaps makes n heap maps with 1 to 8 entries each. None of them grows:
// a classic map grows past 8 entries, and a swiss map's first group
// (growToSmall, on its first insert) is an allocation gopulse does not probe.
// smallOps is its number of inserts.
//
//go:noinline
func smallMaps(n int) {
	for i := 0; i < n; i++ {
		m := make(map[int]int)
		for j := 0; j <= i%8; j++ {
			m[j] = i
		}
		smallSink[i%len(smallSink)] = m
	}
}

func smallOps(n int) int64 {
	var ops int64
	for i := 0; i < n; i++ {
		ops += int64(i%8 + 1)
	}
	return ops
}

// intInsertDelete fills one map (no size hint) with keys and empties it
// again, rounds times: it grows in the first round only, as a long-lived
// cache does.
//
//go:noinline
func intInsertDelete(keys []int64, rounds int) {
	m := make(map[int64]int64)
	for r := 0; r < rounds; r++ {
		for i, k := range keys {
			m[k] = int64(i)
		}
		for _, k := range keys {
			delete(m, k)
		}
	}
	intSink = m
}

// strInsertDelete is intInsertDelete with string keys.
//
//go:noinline
func strInsertDelete(keys []string, rounds int) {
	m := make(map[string]int64)
	for r := 0; r < rounds; r++ {
		for i, k := range keys {
			m[k] = int64(i)
		}
		for _, k := range keys {
			delete(m, k)
		}
	}
	strSink = m
}

// growHeavy builds a fresh map from empty to len(keys) entries, without a
// size hint, rounds times: every growth step of a map's life, over and over.
//
//go:noinline
func growHeavy(keys []int64, rounds int) {
	for r := 0; r < rounds; r++ {
		m := make(map[int64]int64)
		for i, k := range keys {
			m[k] = int64(i)
		}
		growSink = m
	}
}

// appendHeavy builds rounds slices of n int64s and of n strings from
// empty, without a size hint: every append past capacity calls
// runtime.growslice (1, 2, 4, ... elements: 7 growths per 64 appends), the
// slice growth probe's worst case short of a storm.
//
//go:noinline
func appendHeavy(words []string, n, rounds int) {
	for r := 0; r < rounds; r++ {
		var ints []int64
		var strs []string
		for i := 0; i < n; i++ {
			ints = append(ints, int64(i))
			strs = append(strs, words[i])
		}
		appendIntSink, appendStrSink = ints, strs
	}
}

// stormMaps makes n heap maps of 9 entries each, nonstop: an explicit
// growth storm. Each grows exactly once, on its 9th insert: growToTable on
// swiss tables (the first group of 8 is full), hashGrow on classic maps
// (more than 8 entries in one bucket).
//
//go:noinline
func stormMaps(keys []int64, n int) {
	for i := 0; i < n; i++ {
		m := make(map[int64]int64)
		for j, k := range keys {
			m[k] = int64(j)
		}
		stormSink[i%len(stormSink)] = m
	}
}

// Operation counts, sized so that each phase takes about a second on the
// development VM (2 vCPUs, Go 1.27) without the agent.
const (
	smallMapCount = 6_500_000
	growEntries   = 100_000
	growRounds    = 170
	appendLen     = 64
	appendRounds  = 1_500_000
	// stormEntries is what makes one growth per map.
	stormEntries  = 9
	stormMapCount = 1_500_000
)

// sizes are the insert-then-delete phases: map size and rounds per key type.
var sizes = []struct {
	label     string
	n         int
	intRounds int
	strRounds int
}{
	{"8", 8, 3_500_000, 3_500_000},
	{"1k", 1 << 10, 20_000, 16_000},
	{"64k", 64 << 10, 220, 140},
	{"1M", 1 << 20, 4, 2},
}

func phases(scale float64) []harness.Phase {
	scaled := func(n int) int { return harness.Scaled(n, scale) }
	allInts := harness.Keys(sizes[len(sizes)-1].n)
	allStrs := strKeys(allInts)
	var ps []harness.Phase
	nSmall := scaled(smallMapCount)
	ps = append(ps, harness.Phase{Name: "small", Ops: smallOps(nSmall), Run: func() { smallMaps(nSmall) }})
	for _, s := range sizes {
		ks, rounds := allInts[:s.n], scaled(s.intRounds)
		ps = append(ps, harness.Phase{Name: "int-" + s.label, Ops: int64(2 * s.n * rounds),
			Run: func() { intInsertDelete(ks, rounds) }})
	}
	for _, s := range sizes {
		ks, rounds := allStrs[:s.n], scaled(s.strRounds)
		ps = append(ps, harness.Phase{Name: "string-" + s.label, Ops: int64(2 * s.n * rounds),
			Run: func() { strInsertDelete(ks, rounds) }})
	}
	gk, gr := allInts[:growEntries], scaled(growRounds)
	ps = append(ps, harness.Phase{Name: "grow-heavy", Ops: int64(growEntries * gr),
		Run: func() { growHeavy(gk, gr) }})
	ak, ar := allStrs[:appendLen], scaled(appendRounds)
	ps = append(ps, harness.Phase{Name: "append-heavy", Ops: int64(2 * appendLen * ar),
		Run: func() { appendHeavy(ak, appendLen, ar) }})
	// Last, so that whatever the governor does about the storm cannot
	// change what the agent attaches during the other phases.
	nStorm := scaled(stormMapCount)
	sk := allInts[:stormEntries]
	ps = append(ps, harness.Phase{Name: "storm", Ops: int64(stormEntries * nStorm),
		Run: func() { stormMaps(sk, nStorm) }})
	return ps
}

func main() {
	harness.Main("overhead", phases)
}
