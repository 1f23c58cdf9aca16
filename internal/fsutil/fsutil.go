// Package fsutil owns the few file-system helpers every role shares: writing
// a file so that a crash never leaves it torn, copying a stream into a sparse
// file, hashing a file.
package fsutil

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// WriteFileAtomic writes a file through a temporary file, fsync and rename, so
// a crash leaves either the old content or the new, never a torn file.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// sparseBlock is the unit WriteSparse checks for zeros.
const sparseBlock = 4096

// WriteSparse copies r into a new file at path, seeking over all-zero 4 KiB
// blocks so that holes stay holes, and returns the bytes copied. It writes
// through a temporary file renamed into place after fsync: a failed or
// interrupted copy leaves nothing behind.
func WriteSparse(path string, r io.Reader) (int64, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	defer f.Close()
	buf := make([]byte, 1<<20)
	var n int64
	for {
		m, rerr := io.ReadFull(r, buf)
		for off := 0; off < m; off += sparseBlock {
			blk := buf[off:min(off+sparseBlock, m)]
			if isZero(blk) {
				continue
			}
			if _, err := f.WriteAt(blk, n+int64(off)); err != nil {
				return 0, fmt.Errorf("write %s: %w", path, err)
			}
		}
		n += int64(m)
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return 0, fmt.Errorf("write %s: %w", path, rerr)
		}
	}
	if err := f.Truncate(n); err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return 0, fmt.Errorf("write %s: %w", path, err)
	}
	return n, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// SHA256File returns the hex SHA-256 of a file's content.
func SHA256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
