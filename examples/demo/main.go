// Command demo is a small, endless Go workload for `cargo xtask demo`: it
// makes garbage steadily (a GC cycle every second or so), grows maps in
// bursts, reads MemStats and forces a GC now and then, so every kind of
// stop-the-world pause gopulse reports shows up within seconds.
package main

import (
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"
)

// Cache is a deliberately naive store; filling a fresh one makes its maps
// grow (and rehash) over and over.
type Cache struct {
	names map[int]string
	blobs map[string][]byte
}

func NewCache() *Cache {
	return &Cache{names: map[int]string{}, blobs: map[string][]byte{}}
}

// Put stores entry i in both maps.
func (c *Cache) Put(i int) {
	key := "key-" + strconv.Itoa(i)
	c.names[i] = key
	c.blobs[key] = make([]byte, 48)
}

// Len is the number of entries.
func (c *Cache) Len() int { return len(c.names) }

type node struct {
	next    *node
	payload [48]byte
}

var (
	allocated atomic.Int64 // bytes of garbage made so far
	bursts    atomic.Int64 // map bursts done
	sink      atomic.Pointer[node]
	nodes     atomic.Pointer[[]*node]
)

// churn allocates about 3 MiB/s of short-lived garbage, half of it
// pointer-rich so marking has something to walk, and grows a slice of its
// nodes from empty (nine slice growths a tick).
func churn() {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for range tick.C {
		var list *node
		var all []*node // no size hint: it grows as it fills
		for i := 0; i < 256; i++ {
			list = &node{next: list}
			all = append(all, list)
		}
		sink.Store(list)
		nodes.Store(&all)
		buf := make([]byte, 16<<10)
		buf[0] = 1
		allocated.Add(int64(256*64 + len(buf)))
	}
}

// burst fills a fresh cache with n entries and drops it.
func burst(n int) int {
	c := NewCache()
	for i := 0; i < n; i++ {
		c.Put(i)
	}
	bursts.Add(1)
	return c.Len()
}

func main() {
	go churn()
	start := time.Now()
	memTick := time.NewTicker(3 * time.Second)
	burstTick := time.NewTicker(4 * time.Second)
	gcTick := time.NewTicker(7 * time.Second)
	statusTick := time.NewTicker(10 * time.Second)
	var ms runtime.MemStats
	size := 20000
	for {
		select {
		case <-memTick.C:
			runtime.ReadMemStats(&ms)
		case <-burstTick.C:
			// Tens of thousands of keys, varying so the maps end at
			// different sizes.
			burst(size)
			size = 20000 + (size+17000)%60000
		case <-gcTick.C:
			runtime.GC()
		case <-statusTick.C:
			fmt.Printf("demo: up %s, %d GC cycles, heap %d MiB, %d MiB allocated, %d map bursts\n",
				time.Since(start).Round(time.Second), ms.NumGC, ms.HeapAlloc>>20,
				allocated.Load()>>20, bursts.Load())
		}
	}
}
