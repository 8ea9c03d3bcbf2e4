// Command overhead is the workload of `cargo xtask bench overhead`: map
// inserts and deletes in phases, each timed on its own, so the cost of
// gopulse's probes can be read per kind of map traffic.
//
// Protocol (stdin/stdout, one line each):
//
//	-> ready <pid>        keys are generated, nothing timed yet
//	<- go
//	-> done <phase>       after each phase; the harness scrapes the agent
//	<- next
//	-> {...}              one JSON line with every phase, then exit
//
// Everything is deterministic: fixed keys, fixed operation counts, a
// runtime.GC() before each phase (outside the timing) so every phase starts
// from the same heap.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strings"
	"time"
)

// Phase is one timed part of the workload.
type Phase struct {
	Name string
	// Ops is the number of map operations (inserts plus deletes) run does.
	Ops int64
	run func()
}

// Result is what the JSON line reports for one phase.
type Result struct {
	Name    string  `json:"name"`
	Ops     int64   `json:"ops"`
	Ns      int64   `json:"ns"`
	NsPerOp float64 `json:"ns_per_op"`
	GCs     uint32  `json:"gcs"`
}

// Report is the JSON line.
type Report struct {
	GoVersion  string   `json:"go_version"`
	GOMAXPROCS int      `json:"gomaxprocs"`
	Phases     []Result `json:"phases"`
	// PhaseNs is the sum of the phases' times; WallNs runs from "go" to the
	// end of the last phase and includes the pauses between phases.
	PhaseNs int64 `json:"phase_ns"`
	WallNs  int64 `json:"wall_ns"`
}

// Sinks keep maps reachable so they escape to the heap, as maps that outlive
// a call do: a non-escaping small map lives on the stack and never grows.
var (
	smallSink [1024]map[int]int
	intSink   map[int64]int64
	strSink   map[string]int64
	growSink  map[int64]int64
)

// keys returns n distinct pseudo-random int64 keys (xorshift64*, fixed seed).
func keys(n int) []int64 {
	out := make([]int64, n)
	seen := make(map[int64]struct{}, n)
	x := uint64(0x9E3779B97F4A7C15)
	for i := 0; i < n; {
		x ^= x >> 12
		x ^= x << 25
		x ^= x >> 27
		k := int64(x * 0x2545F4914F6CDD1D)
		if _, dup := seen[k]; dup {
			continue
		}
		seen[k] = struct{}{}
		out[i] = k
		i++
	}
	return out
}

// strKeys turns int keys into 20-byte strings, made before anything is timed.
func strKeys(ints []int64) []string {
	out := make([]string, len(ints))
	for i, k := range ints {
		out[i] = fmt.Sprintf("key-%016x", uint64(k))
	}
	return out
}

// smallMaps makes n heap maps with 1 to 8 entries each: on swiss tables every
// one grows once (growToSmall on its first insert), the worst case for growth
// probes. smallOps is its number of inserts.
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

// Operation counts, sized so that each phase takes about a second on the
// development VM (2 vCPUs, Go 1.27) without the agent.
const (
	smallMapCount = 6_500_000
	growEntries   = 100_000
	growRounds    = 170
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

func phases(scale float64) []Phase {
	scaled := func(n int) int {
		s := int(float64(n) * scale)
		if s < 1 {
			s = 1
		}
		return s
	}
	allInts := keys(sizes[len(sizes)-1].n)
	allStrs := strKeys(allInts)
	var ps []Phase
	nSmall := scaled(smallMapCount)
	ps = append(ps, Phase{"small", smallOps(nSmall), func() { smallMaps(nSmall) }})
	for _, s := range sizes {
		ks, rounds := allInts[:s.n], scaled(s.intRounds)
		ps = append(ps, Phase{"int-" + s.label, int64(2 * s.n * rounds),
			func() { intInsertDelete(ks, rounds) }})
	}
	for _, s := range sizes {
		ks, rounds := allStrs[:s.n], scaled(s.strRounds)
		ps = append(ps, Phase{"string-" + s.label, int64(2 * s.n * rounds),
			func() { strInsertDelete(ks, rounds) }})
	}
	gk, gr := allInts[:growEntries], scaled(growRounds)
	ps = append(ps, Phase{"grow-heavy", int64(growEntries * gr), func() { growHeavy(gk, gr) }})
	return ps
}

func main() {
	scale := flag.Float64("scale", 1, "multiply every operation count by this (a quick check: 0.05)")
	only := flag.String("phases", "", "comma-separated phase names to run (default: all)")
	flag.Parse()

	all := phases(*scale)
	if *only != "" {
		want := map[string]bool{}
		for _, n := range strings.Split(*only, ",") {
			want[n] = true
		}
		var kept []Phase
		for _, p := range all {
			if want[p.Name] {
				kept = append(kept, p)
			}
		}
		all = kept
	}

	in := bufio.NewScanner(os.Stdin)
	expect := func(word string) {
		if !in.Scan() || strings.TrimSpace(in.Text()) != word {
			fmt.Fprintf(os.Stderr, "overhead: expected %q on stdin\n", word)
			os.Exit(2)
		}
	}
	fmt.Printf("ready %d\n", os.Getpid())
	expect("go")

	rep := Report{GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0)}
	var ms runtime.MemStats
	wall := time.Now()
	for i, p := range all {
		if i > 0 {
			expect("next")
		}
		runtime.GC()
		runtime.ReadMemStats(&ms)
		gcs := ms.NumGC
		start := time.Now()
		p.run()
		ns := time.Since(start).Nanoseconds()
		runtime.ReadMemStats(&ms)
		rep.Phases = append(rep.Phases, Result{
			Name: p.Name, Ops: p.Ops, Ns: ns,
			NsPerOp: float64(ns) / float64(p.Ops), GCs: ms.NumGC - gcs,
		})
		rep.PhaseNs += ns
		fmt.Printf("done %s\n", p.Name)
	}
	expect("next")
	rep.WallNs = time.Since(wall).Nanoseconds()
	line, err := json.Marshal(rep)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(line))
}
