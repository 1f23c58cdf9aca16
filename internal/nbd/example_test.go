package nbd_test

import (
	"context"
	"log"
	"log/slog"
	"net"
	"os"
	"os/signal"

	"github.com/vmbond/vmbond/internal/nbd"
)

// memDisk is a toy Backend; vmbond's agent passes an encrypting one.
type memDisk []byte

func (d memDisk) ReadAt(p []byte, off int64) (int, error)  { return copy(p, d[off:]), nil }
func (d memDisk) WriteAt(p []byte, off int64) (int, error) { return copy(d[off:], p), nil }
func (d memDisk) Size() int64                              { return int64(len(d)) }
func (d memDisk) Flush() error                             { return nil }

// Serve a disk on a unix socket until interrupted. QEMU attaches with
// -drive file=nbd+unix:///vm0?socket=/run/vmbond/vm0.sock,format=raw
func Example() {
	l, err := net.Listen("unix", "/run/vmbond/vm0.sock")
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	s := &nbd.Server{
		Backend: make(memDisk, 64<<20),
		Name:    "vm0",
		Logger:  slog.Default(),
	}
	if err := s.Serve(ctx, l); err != context.Canceled {
		log.Fatal(err)
	}
}
