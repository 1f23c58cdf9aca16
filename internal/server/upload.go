package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"

	"github.com/vmbond/vmbond/internal/proto"
)

// sparseBlock is the granularity at which all-zero data is skipped.
const sparseBlock = 4096

// uploadPath is where an uploaded file for vm lives: the disk image, or a
// boot file ("kernel", "initrd").
func (s *Server) uploadPath(vm, file string) string {
	if file == "disk" {
		return filepath.Join(s.cfg.DataDir, "images", vm+".img")
	}
	return filepath.Join(s.cfg.DataDir, "boot", vm, file)
}

// receiveFile streams the request body (ciphertext the server cannot read)
// to dst through a temporary file and a rename, sparse, at most max bytes.
// The caller's tenant becomes the owner of the vm id in the same
// transaction as the rename; nothing is left behind on failure.
func (s *Server) receiveFile(c *call, vm, dst string, max int64) (int64, error) {
	if c.r.ContentLength > max {
		return 0, errorf(http.StatusRequestEntityTooLarge, proto.CodeBadRequest, "upload of %d bytes exceeds the limit of %d bytes", c.r.ContentLength, max)
	}
	if err := s.store.vmIDFree(vm, c.who.tenant); err != nil {
		return 0, storeError("check vm id", err)
	}
	dir := filepath.Dir(dst)
	_, statErr := os.Stat(dir)
	madeDir := errors.Is(statErr, fs.ErrNotExist)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, internalError("create upload directory", err)
	}
	done := false
	defer func() {
		if !done && madeDir {
			os.Remove(dir) // only if still empty
		}
	}()
	f, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".upload*")
	if err != nil {
		return 0, internalError("create upload file", err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			f.Close()
		}
		os.Remove(tmp) // after a successful rename this finds nothing
	}()
	n, err := copySparse(c.r.Context(), f, io.LimitReader(c.r.Body, max+1))
	if err != nil {
		return 0, errorf(http.StatusBadRequest, proto.CodeBadRequest, "receive upload: %v", err)
	}
	if n > max {
		return 0, errorf(http.StatusRequestEntityTooLarge, proto.CodeBadRequest, "upload exceeds the limit of %d bytes", max)
	}
	if err := f.Truncate(n); err != nil {
		return 0, internalError("size upload file", err)
	}
	if err := f.Sync(); err != nil {
		return 0, internalError("sync upload file", err)
	}
	err = f.Close()
	f = nil
	if err != nil {
		return 0, internalError("close upload file", err)
	}
	if err := s.store.claimVM(vm, c.who.tenant, func() error { return os.Rename(tmp, dst) }); err != nil {
		return 0, storeError("store upload", err)
	}
	done = true
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return n, nil
}

// copySparse copies r to the start of f, skipping all-zero 4 KiB blocks
// (leaving holes) and writing runs of other blocks. It returns the number of
// bytes read; the caller truncates f to that size so trailing holes count.
func copySparse(ctx context.Context, f *os.File, r io.Reader) (int64, error) {
	buf := make([]byte, 1<<20)
	zero := make([]byte, sparseBlock)
	var off int64
	for {
		if err := ctx.Err(); err != nil {
			return off, err
		}
		n, rerr := io.ReadFull(r, buf)
		chunk := buf[:n]
		for i := 0; i < len(chunk); {
			end := min(i+sparseBlock, len(chunk))
			if bytes.Equal(chunk[i:end], zero[:end-i]) {
				i = end
				continue
			}
			// Extend the run of non-zero blocks and write it at once.
			j := end
			for j < len(chunk) {
				e := min(j+sparseBlock, len(chunk))
				if bytes.Equal(chunk[j:e], zero[:e-j]) {
					break
				}
				j = e
			}
			if _, err := f.WriteAt(chunk[i:j], off+int64(i)); err != nil {
				return off, fmt.Errorf("write upload file: %w", err)
			}
			i = j
		}
		off += int64(n)
		switch {
		case rerr == nil:
		case errors.Is(rerr, io.EOF), errors.Is(rerr, io.ErrUnexpectedEOF):
			return off, nil
		default:
			return off, rerr
		}
	}
}
