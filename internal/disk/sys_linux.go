package disk

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// control runs fn on f's descriptor; it keeps f from being closed meanwhile.
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func unsupported(err error) error {
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%w: %v", errors.ErrUnsupported, err)
	}
	return err
}

// punchHole deallocates [off, off+n) of f without changing its size.
func punchHole(f *os.File, off, n int64) error {
	return control(f, func(fd int) error {
		return unsupported(unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n))
	})
}

// zeroRange makes [off, off+n) of f read as zeros, keeping it allocated.
func zeroRange(f *os.File, off, n int64) error {
	return control(f, func(fd int) error {
		return unsupported(unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n))
	})
}

// nextData returns the first data offset >= off, or ok=false if only a hole
// follows up to the end of the file.
func nextData(f *os.File, off int64) (pos int64, ok bool, err error) {
	err = control(f, func(fd int) error {
		var err error
		pos, err = unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil
		}
		ok = err == nil
		return unsupported(err)
	})
	return pos, ok, err
}

// nextHole returns the first hole offset >= off (the file size if none).
func nextHole(f *os.File, off int64) (int64, error) {
	var pos int64
	err := control(f, func(fd int) error {
		var err error
		pos, err = unix.Seek(fd, off, unix.SEEK_HOLE)
		return unsupported(err)
	})
	return pos, err
}

// fdatasync flushes f's data and the metadata needed to read it back.
func fdatasync(f *os.File) error {
	return control(f, unix.Fdatasync)
}
