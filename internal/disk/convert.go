package disk

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/vmbond/vmbond/internal/luks"
)

// CreateFrom makes a LUKS1 image at path (which must not exist) from size
// bytes of plaintext read from src; size must be a multiple of 512. All-zero
// 4 KiB blocks are not written, so the image stays as sparse as the data.
// On error the partial image is removed.
func CreateFrom(path string, src io.Reader, size int64, volumeKey, passphrase []byte, opts ...luks.Option) (err error) {
	if err := Create(path, volumeKey, passphrase, size, opts...); err != nil {
		return err
	}
	d, err := Open(path, volumeKey)
	if err != nil {
		os.Remove(path)
		return err
	}
	defer func() {
		if cerr := d.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("disk: closing %s: %w", path, cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()

	buf := make([]byte, chunkSize)
	for pos := int64(0); pos < size; {
		chunk := buf[:min(int64(len(buf)), size-pos)]
		if _, err := io.ReadFull(src, chunk); err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("disk: source ended before %d bytes (at or after %d)", size, pos)
			}
			return fmt.Errorf("disk: reading source at %d: %w", pos, err)
		}
		// Write runs of non-zero blocks; skip zero blocks.
		for i := 0; i < len(chunk); {
			if isZero(chunk[i:min(i+blockSize, len(chunk))]) {
				i += blockSize
				continue
			}
			j := i + blockSize
			for j < len(chunk) && !isZero(chunk[j:min(j+blockSize, len(chunk))]) {
				j += blockSize
			}
			j = min(j, len(chunk))
			if _, err := d.WriteAt(chunk[i:j], pos+int64(i)); err != nil {
				return err
			}
			i = j
		}
		pos += int64(len(chunk))
	}
	return d.Flush()
}

func isZero(b []byte) bool {
	for len(b) >= sectorSize {
		if !isZeroSector(b) {
			return false
		}
		b = b[sectorSize:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// ExportPlain writes the whole decrypted payload of the LUKS1 image at path
// to w, for recovery. Never-written sectors come out as zeros.
func ExportPlain(path string, volumeKey []byte, w io.Writer) error {
	d, err := open(path, volumeKey, os.O_RDONLY)
	if err != nil {
		return err
	}
	defer d.Close()
	buf := make([]byte, chunkSize)
	for pos := int64(0); pos < d.size; {
		n, err := d.ReadAt(buf[:min(int64(len(buf)), d.size-pos)], pos)
		if err != nil && err != io.EOF {
			return err
		}
		if _, err := w.Write(buf[:n]); err != nil {
			return fmt.Errorf("disk: exporting %s: writing at %d: %w", path, pos, err)
		}
		pos += int64(n)
	}
	return nil
}
