package audit

import (
	"os"
	"syscall"
)

// dataSync makes the data written to f durable. fdatasync skips metadata
// that is not needed to read the data back (timestamps), which makes the
// appender's sync cheaper than fsync.
func dataSync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		for {
			serr = syscall.Fdatasync(int(fd))
			if serr != syscall.EINTR {
				return
			}
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: serr}
	}
	return nil
}
