// Package harness is what the benchmark workloads share: the line protocol
// `cargo xtask bench` drives them with, the timing of each phase and the
// JSON report, and deterministic keys.
//
// Protocol (stdin/stdout, one line each):
//
//	-> ready <pid>        keys are generated, nothing timed yet
//	<- go
//	-> done <phase>       after each phase; the harness scrapes the agent
//	<- next
//	-> {...}              one JSON line with every phase, then exit
//
// Before each phase the workload calls runtime.GC() outside the timing, so
// every phase starts from the same heap.
package harness

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

// Phase is one timed part of a workload.
type Phase struct {
	Name string
	// Ops is the number of operations Run does; the report divides the
	// phase's time by it.
	Ops int64
	// Probes names the gopulse programs the phase is there to measure
	// (`cargo xtask bench probes`); empty for the overhead workload.
	Probes []string
	// Batches, above 1, times the phase in that many parts: Run then does
	// Ops/Batches operations and is called Batches times, and the report
	// has each part's ns/op too. A burst of noise (the host, a neighbour)
	// then spoils one part, not the phase.
	Batches int
	Run     func()
}

// Result is what the JSON line reports for one phase.
type Result struct {
	Name    string   `json:"name"`
	Ops     int64    `json:"ops"`
	Ns      int64    `json:"ns"`
	NsPerOp float64  `json:"ns_per_op"`
	GCs     uint32   `json:"gcs"`
	Probes  []string `json:"probes,omitempty"`
	// BatchNsPerOp is each part's ns/op, for phases timed in parts.
	BatchNsPerOp []float64 `json:"batch_ns_per_op,omitempty"`
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

// Keys returns n distinct pseudo-random int64 keys (xorshift64*, fixed seed).
func Keys(n int) []int64 {
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

// Scaled multiplies an operation count by scale, keeping at least 1.
func Scaled(n int, scale float64) int {
	s := int(float64(n) * scale)
	if s < 1 {
		s = 1
	}
	return s
}

// Main parses -scale and -phases, builds the phases with phases(scale) and
// runs the protocol. name prefixes error messages.
func Main(name string, phases func(scale float64) []Phase) {
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
				delete(want, p.Name)
			}
		}
		for n := range want {
			fmt.Fprintf(os.Stderr, "%s: no phase %q\n", name, n)
			os.Exit(2)
		}
		all = kept
	}
	Run(name, all)
}

// Run runs the protocol over phases.
func Run(name string, phases []Phase) {
	in := bufio.NewScanner(os.Stdin)
	expect := func(word string) {
		if !in.Scan() || strings.TrimSpace(in.Text()) != word {
			fmt.Fprintf(os.Stderr, "%s: expected %q on stdin\n", name, word)
			os.Exit(2)
		}
	}
	fmt.Printf("ready %d\n", os.Getpid())
	expect("go")

	rep := Report{GoVersion: runtime.Version(), GOMAXPROCS: runtime.GOMAXPROCS(0)}
	var ms runtime.MemStats
	wall := time.Now()
	for i, p := range phases {
		if i > 0 {
			expect("next")
		}
		runtime.GC()
		runtime.ReadMemStats(&ms)
		gcs := ms.NumGC
		var batches []float64
		start := time.Now()
		if p.Batches > 1 {
			perBatch := float64(p.Ops) / float64(p.Batches)
			for b := 0; b < p.Batches; b++ {
				t := time.Now()
				p.Run()
				batches = append(batches, float64(time.Since(t).Nanoseconds())/perBatch)
			}
		} else {
			p.Run()
		}
		ns := time.Since(start).Nanoseconds()
		runtime.ReadMemStats(&ms)
		rep.Phases = append(rep.Phases, Result{
			Name: p.Name, Ops: p.Ops, Ns: ns,
			NsPerOp: float64(ns) / float64(p.Ops), GCs: ms.NumGC - gcs,
			Probes: p.Probes, BatchNsPerOp: batches,
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
