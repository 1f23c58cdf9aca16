//go:build !linux

package disk

import (
	"errors"
	"os"
)

// The tenant's client may run on other systems: fall back to writing zeros
// and to reporting everything as allocated.

func punchHole(f *os.File, off, n int64) error { return errors.ErrUnsupported }

func zeroRange(f *os.File, off, n int64) error { return errors.ErrUnsupported }

func nextData(f *os.File, off int64) (int64, bool, error) { return 0, false, errors.ErrUnsupported }

func nextHole(f *os.File, off int64) (int64, error) { return 0, errors.ErrUnsupported }

func fdatasync(f *os.File) error { return f.Sync() }
