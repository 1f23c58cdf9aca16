package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmbond/vmbond/internal/nbd"
)

var (
	_ nbd.Backend       = (*Plain)(nil)
	_ nbd.Trimmer       = (*Plain)(nil)
	_ nbd.Zeroer        = (*Plain)(nil)
	_ nbd.BlockStatuser = (*Plain)(nil)
)

// Plain serves a raw image file with no encryption: "vmbond with encryption
// off", the baseline that benchmarks compare Encrypted against. It is safe
// for concurrent use.
type Plain struct {
	f    *os.File
	size int64
}

// CreatePlain makes a sparse raw image of size bytes at path, which must not
// exist.
func CreatePlain(path string, size int64) error {
	if size < 0 {
		return fmt.Errorf("disk: creating %s: negative size %d", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("disk: creating raw image: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("disk: sizing %s: %w", path, err)
	}
	return f.Close()
}

// OpenPlain opens the raw image at path for reading and writing.
func OpenPlain(path string) (*Plain, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("disk: opening raw image: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("disk: opening raw image: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("disk: opening %s: not a regular file", path)
	}
	return &Plain{f: f, size: fi.Size()}, nil
}

// Size returns the image size in bytes.
func (p *Plain) Size() int64 { return p.size }

// Close closes the image file.
func (p *Plain) Close() error { return p.f.Close() }

// ReadAt reads from the image; reading past Size returns io.EOF.
func (p *Plain) ReadAt(b []byte, off int64) (int, error) {
	if off >= p.size && len(b) > 0 {
		return 0, io.EOF
	}
	if rem := p.size - off; int64(len(b)) > rem {
		n, err := p.f.ReadAt(b[:rem], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return p.f.ReadAt(b, off)
}

// WriteAt writes to the image within Size.
func (p *Plain) WriteAt(b []byte, off int64) (int, error) {
	if err := p.checkRange(off, int64(len(b))); err != nil {
		return 0, err
	}
	return p.f.WriteAt(b, off)
}

// Flush makes every completed write durable.
func (p *Plain) Flush() error {
	if err := fdatasync(p.f); err != nil {
		return fmt.Errorf("disk: flushing: %w", err)
	}
	return nil
}

func (p *Plain) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > p.size || n > p.size-off {
		return fmt.Errorf("disk: range [%d, +%d) outside disk of %d bytes", off, n, p.size)
	}
	return nil
}

// Trim deallocates [off, off+length); it reads as zeros afterwards.
func (p *Plain) Trim(off, length int64) error { return p.WriteZeroes(off, length, true) }

// WriteZeroes zeros [off, off+length), deallocating it if mayTrim.
func (p *Plain) WriteZeroes(off, length int64, mayTrim bool) error {
	if err := p.checkRange(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	// The kernel zeros partial blocks itself, so no alignment is needed.
	op, what := zeroRange, "zeroing"
	if mayTrim {
		op, what = punchHole, "punching hole"
	}
	err := op(p.f, off, length)
	if err == nil {
		return nil
	}
	if !errors.Is(err, errors.ErrUnsupported) {
		return fmt.Errorf("disk: %s [%d, +%d): %w", what, off, length, err)
	}
	zeros := make([]byte, min(length, chunkSize))
	for done := int64(0); done < length; {
		n, err := p.f.WriteAt(zeros[:min(int64(len(zeros)), length-done)], off+done)
		if err != nil {
			return fmt.Errorf("disk: writing zeros: %w", err)
		}
		done += int64(n)
	}
	return nil
}

// BlockStatus reports holes and allocated data in [off, off+length).
func (p *Plain) BlockStatus(off, length int64) ([]nbd.Extent, error) {
	if err := p.checkRange(off, length); err != nil {
		return nil, err
	}
	return extents(p.f, 0, off, length)
}
