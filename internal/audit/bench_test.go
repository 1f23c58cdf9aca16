package audit

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func BenchmarkAppend(b *testing.B) {
	for _, appenders := range []int{1, 64, 256} {
		b.Run(fmt.Sprintf("appenders=%d", appenders), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"))
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			e := Event{Host: "host1", Actor: "tenant:alice", VM: "vm-0123456789", Op: "start", Decision: Allowed,
				Reason: "policy allows tenant", Request: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
			var wg sync.WaitGroup
			var left atomic.Int64
			left.Store(int64(b.N))
			b.ResetTimer()
			start := time.Now()
			for range appenders {
				wg.Go(func() {
					for left.Add(-1) >= 0 {
						if _, err := l.Append(e); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "entries/s")
		})
	}
}

// writeBenchLog writes a log of n typical entries without syncing.
func writeBenchLog(b *testing.B, path string, n int) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	var prev [hashSize]byte
	var line []byte
	t := time.Now()
	for i := 1; i <= n; i++ {
		e := Event{Time: t.Add(time.Duration(i) * time.Microsecond), Host: "host1", Actor: "tenant:alice", VM: fmt.Sprintf("vm-%d", i%100),
			Op: "start", Decision: Allowed, Reason: "policy allows tenant", Request: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
		salt := [16]byte{byte(i), byte(i >> 8), byte(i >> 16)}
		line = appendPrefix(line[:0], uint64(i), &prev)
		start := len(line)
		line = appendBody(line, &e, &salt)
		bh := sha256.Sum256(line[start:])
		prev = entryHash(uint64(i), &prev, &bh)
		w.Write(append(line, '\n'))
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	f.Close()
}

func BenchmarkVerify(b *testing.B) {
	const n = 1_000_000
	path := filepath.Join(b.TempDir(), "audit.log")
	writeBenchLog(b, path, n)
	st, _ := os.Stat(path)
	b.SetBytes(st.Size())
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		rep, err := VerifyLog(f, nil, nil)
		f.Close()
		if err != nil || rep.Entries != n {
			b.Fatalf("%v %+v", err, rep)
		}
	}
	b.ReportMetric(float64(n)*float64(b.N)/time.Since(start).Seconds(), "entries/s")
}
