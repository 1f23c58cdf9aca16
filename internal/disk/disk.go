// Package disk owns the block devices vmbond's host agent serves over NBD:
// Encrypted, the payload of a LUKS1 image encrypted with AES-256-XTS
// (plain64) on the fly, and Plain, a raw file with no encryption (used to
// measure what encryption costs). It also converts between plaintext
// streams and LUKS1 images for the tenant's client.
//
// It handles volume keys and plaintext, so it runs only on trusted machines
// (the host agent and the tenant's client); storage only ever sees the
// ciphertext it writes.
//
// Images are sparse: a blank disk costs nothing until written. vmbond reads
// never-written sectors (holes, and sectors whose ciphertext is all zeros) as
// plaintext zeros. A standard tool (cryptsetup, qemu-img) decrypts those same
// sectors to pseudo-random garbage instead, because it decrypts the zeros.
// Only data a guest wrote is meaningful to it anyway, so this is harmless
// after leaving vmbond, but it means an exported image is not bit-identical
// for never-written sectors unless exported with ExportPlain.
package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/vmbond/vmbond/internal/luks"
	"github.com/vmbond/vmbond/internal/nbd"
	"github.com/vmbond/vmbond/internal/xts"
)

const (
	sectorSize = xts.SectorSize
	// blockSize is the unit holes are punched in: the page and file system
	// block size on the hosts vmbond runs on.
	blockSize = 4096
	// chunkSize is the size of large pooled buffers; larger requests are
	// done in chunks of it.
	chunkSize = 1 << 20
	// smallChunk is the size of small pooled buffers, for the common small
	// requests: they should not touch a megabyte of cache.
	smallChunk = 64 << 10
	// maxExtents bounds a BlockStatus reply; NBD lets it cover less than
	// asked.
	maxExtents = 1024
)

var (
	_ nbd.Backend       = (*Encrypted)(nil)
	_ nbd.Trimmer       = (*Encrypted)(nil)
	_ nbd.Zeroer        = (*Encrypted)(nil)
	_ nbd.BlockStatuser = (*Encrypted)(nil)
)

// Encrypted is the plaintext view of a LUKS1 image's payload. Its methods
// accept any byte range within Size and are safe for concurrent use.
type Encrypted struct {
	f     *os.File
	c     *xts.Cipher
	base  int64 // payload offset in the file
	size  int64
	locks rangeLock
	small sync.Pool // *[]byte of smallChunk
	large sync.Pool // *[]byte of chunkSize
}

// Create makes a LUKS1 image at path (which must not exist) whose payload is
// size bytes, a multiple of 512, all unallocated. volumeKey is the 64-byte
// AES-256-XTS key; passphrase goes into key slot 0 for standard tools.
func Create(path string, volumeKey, passphrase []byte, size int64, opts ...luks.Option) (err error) {
	if size <= 0 || size%sectorSize != 0 {
		return fmt.Errorf("disk: creating %s: size %d is not a positive multiple of %d", path, size, sectorSize)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("disk: creating image: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	h, err := luks.Create(f, volumeKey, passphrase, opts...)
	if err != nil {
		return fmt.Errorf("disk: creating %s: %w", path, err)
	}
	// Truncate leaves the payload a hole: storage costs nothing until written.
	if err := f.Truncate(h.PayloadOffset() + size); err != nil {
		return fmt.Errorf("disk: sizing %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("disk: syncing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("disk: closing %s: %w", path, err)
	}
	return nil
}

// Open opens the LUKS1 image at path for reading and writing and checks
// volumeKey against the header's digest. A file that is not a LUKS1 image
// gives an error wrapping luks.ErrNotLUKS; a key that does not match (for
// instance because the operator substituted another disk) one wrapping
// luks.ErrWrongKey.
func Open(path string, volumeKey []byte) (*Encrypted, error) {
	return open(path, volumeKey, os.O_RDWR)
}

func open(path string, volumeKey []byte, flag int) (*Encrypted, error) {
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("disk: opening image: %w", err)
	}
	d, err := newEncrypted(f, volumeKey)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("disk: opening %s: %w", path, err)
	}
	return d, nil
}

func newEncrypted(f *os.File, volumeKey []byte) (*Encrypted, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file (%v)", fi.Mode().Type())
	}
	h, err := luks.ReadHeader(f)
	if err != nil {
		return nil, err
	}
	if err := h.CheckCipher(); err != nil {
		return nil, err
	}
	if err := h.VerifyVolumeKey(volumeKey); err != nil {
		return nil, err
	}
	base := h.PayloadOffset()
	if fi.Size() < base {
		return nil, fmt.Errorf("image is %d bytes, shorter than its payload offset %d", fi.Size(), base)
	}
	c, err := xts.New(volumeKey)
	if err != nil {
		return nil, err
	}
	d := &Encrypted{
		f:    f,
		c:    c,
		base: base,
		// A trailing partial sector cannot be decrypted; dm-crypt and qemu
		// ignore it too.
		size: (fi.Size() - base) / sectorSize * sectorSize,
	}
	d.locks.init()
	d.small.New = func() any {
		b := make([]byte, smallChunk)
		return &b
	}
	d.large.New = func() any {
		b := make([]byte, chunkSize)
		return &b
	}
	return d, nil
}

// getBuf returns a pooled buffer for a request of n bytes (plus up to two
// partial sectors) and the pool to put it back in.
func (d *Encrypted) getBuf(n int64) (*[]byte, *sync.Pool) {
	pool := &d.large
	if n+2*sectorSize <= smallChunk {
		pool = &d.small
	}
	return pool.Get().(*[]byte), pool
}

// Size returns the payload size in bytes.
func (d *Encrypted) Size() int64 { return d.size }

// Close closes the image file.
func (d *Encrypted) Close() error { return d.f.Close() }

// Flush makes every completed write durable.
func (d *Encrypted) Flush() error {
	if err := fdatasync(d.f); err != nil {
		return fmt.Errorf("disk: flushing: %w", err)
	}
	return nil
}

func (d *Encrypted) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("disk: range [%d, +%d) outside disk of %d bytes", off, n, d.size)
	}
	return nil
}

// lockRange locks the sectors that bytes [off, off+n) touch.
func (d *Encrypted) lockRange(off, n int64, write bool) uint64 {
	return d.locks.lock(off/sectorSize, (off+n+sectorSize-1)/sectorSize, write)
}

// ReadAt reads plaintext. It follows io.ReaderAt: reading past Size returns
// io.EOF.
func (d *Encrypted) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("disk: read at negative offset %d", off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= d.size {
		return 0, io.EOF
	}
	var eof error
	if rem := d.size - off; int64(len(p)) > rem {
		p, eof = p[:rem], io.EOF
	}
	defer d.locks.unlock(d.lockRange(off, int64(len(p)), false))

	if off%sectorSize == 0 && len(p)%sectorSize == 0 {
		// Aligned: decrypt in place in the caller's buffer, no copy.
		if err := d.readSectors(p, off/sectorSize); err != nil {
			return 0, err
		}
		return len(p), eof
	}
	bp, pool := d.getBuf(int64(len(p)))
	defer pool.Put(bp)
	buf := *bp
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		sec := pos / sectorSize
		skip := int(pos - sec*sectorSize)
		m := min(len(p)-n, len(buf)-skip)
		span := (skip + m + sectorSize - 1) / sectorSize * sectorSize
		if err := d.readSectors(buf[:span], sec); err != nil {
			return n, err
		}
		n += copy(p[n:n+m], buf[skip:skip+m])
	}
	return n, eof
}

// readSectors reads and decrypts whole sectors starting at sector into buf.
func (d *Encrypted) readSectors(buf []byte, sector int64) error {
	n, err := d.f.ReadAt(buf, d.base+sector*sectorSize)
	if n < len(buf) {
		if err != io.EOF {
			return fmt.Errorf("disk: reading sectors %d+%d: %w", sector, len(buf)/sectorSize, err)
		}
		// The file shrank under us; what is gone reads as a hole.
		clear(buf[n:])
	}
	d.decrypt(buf, sector)
	return nil
}

// decrypt decrypts buf in place, leaving all-zero sectors as zeros. Holes
// read as zeros, and XTS ciphertext that is all zeros is a 2^-4096 event per
// sector, so zero ciphertext means "never written" (or trimmed). Checking
// the data rather than asking lseek(SEEK_HOLE) costs no system call, cannot
// race with a concurrent hole punch, and also covers file systems that zero
// partial blocks instead of deallocating them.
func (d *Encrypted) decrypt(buf []byte, sector int64) {
	for i := 0; i < len(buf); {
		if isZeroSector(buf[i:]) {
			i += sectorSize
			continue
		}
		j := i + sectorSize
		for j < len(buf) && !isZeroSector(buf[j:]) {
			j += sectorSize
		}
		d.c.DecryptParallel(buf[i:j], buf[i:j], uint64(sector)+uint64(i/sectorSize))
		i = j
	}
}

func isZeroSector(b []byte) bool {
	return [sectorSize]byte(b[:sectorSize]) == [sectorSize]byte{}
}

// WriteAt encrypts and writes p. Unaligned edges are read, modified and
// rewritten under the range lock.
func (d *Encrypted) WriteAt(p []byte, off int64) (int, error) {
	if err := d.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	defer d.locks.unlock(d.lockRange(off, int64(len(p)), true))
	n, err := d.writeLocked(p, off, int64(len(p)))
	return int(n), err
}

// writeLocked encrypts p, or zeros if p is nil, into [off, off+n). The caller
// holds the write lock for the range.
func (d *Encrypted) writeLocked(p []byte, off, n int64) (int64, error) {
	bp, pool := d.getBuf(n)
	defer pool.Put(bp)
	buf := *bp
	var done int64
	for done < n {
		pos := off + done
		sec := pos / sectorSize
		skip := int(pos - sec*sectorSize)
		m := int(min(n-done, int64(len(buf)-skip)))
		span := (skip + m + sectorSize - 1) / sectorSize * sectorSize
		chunk := buf[:span]
		if skip != 0 {
			if err := d.readSectors(chunk[:sectorSize], sec); err != nil {
				return done, err
			}
		}
		// Read the tail sector unless it is the head sector just read.
		if (skip+m)%sectorSize != 0 && (span > sectorSize || skip == 0) {
			last := span - sectorSize
			if err := d.readSectors(chunk[last:], sec+int64(last/sectorSize)); err != nil {
				return done, err
			}
		}
		if p != nil {
			copy(chunk[skip:skip+m], p[done:])
		} else {
			clear(chunk[skip : skip+m])
		}
		d.c.EncryptParallel(chunk, chunk, uint64(sec))
		if _, err := d.f.WriteAt(chunk, d.base+sec*sectorSize); err != nil {
			return done, fmt.Errorf("disk: writing sectors %d+%d: %w", sec, span/sectorSize, err)
		}
		done += int64(m)
	}
	return done, nil
}

// Trim discards [off, off+length): whole 4 KiB blocks become holes, and
// partial blocks at the edges are overwritten with encrypted zeros, so the
// range reads as zeros afterwards.
func (d *Encrypted) Trim(off, length int64) error {
	return d.WriteZeroes(off, length, true)
}

// WriteZeroes makes [off, off+length) read as zeros. With mayTrim, whole
// 4 KiB blocks are deallocated (falling back to writing if the file system
// cannot punch holes); otherwise, and at the edges, encrypted zeros are
// written, which standard tools also decrypt to zeros.
func (d *Encrypted) WriteZeroes(off, length int64, mayTrim bool) error {
	if err := d.checkRange(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	defer d.locks.unlock(d.lockRange(off, length, true))
	end := off + length
	if mayTrim {
		// Align in file coordinates: the file system allocates blocks there.
		a := alignUp(d.base+off, blockSize) - d.base
		b := alignDown(d.base+end, blockSize) - d.base
		if a < b {
			err := punchHole(d.f, d.base+a, b-a)
			if err == nil {
				if _, err := d.writeLocked(nil, off, a-off); err != nil {
					return err
				}
				_, err := d.writeLocked(nil, b, end-b)
				return err
			}
			if !errors.Is(err, errors.ErrUnsupported) {
				return fmt.Errorf("disk: punching hole [%d, %d): %w", a, b, err)
			}
		}
	}
	_, err := d.writeLocked(nil, off, length)
	return err
}

// BlockStatus reports which parts of [off, off+length) are holes (which
// read as zeros) and which are allocated. It may cover less than length if
// the range is very fragmented.
func (d *Encrypted) BlockStatus(off, length int64) ([]nbd.Extent, error) {
	if err := d.checkRange(off, length); err != nil {
		return nil, err
	}
	return extents(d.f, d.base, off, length)
}

// extents maps [off, off+length) of the data starting at base in f to
// holes and data with lseek(SEEK_DATA/SEEK_HOLE).
func extents(f *os.File, base, off, length int64) ([]nbd.Extent, error) {
	var out []nbd.Extent
	pos, end := base+off, base+off+length
	for pos < end && len(out) < maxExtents {
		data, ok, err := nextData(f, pos)
		if errors.Is(err, errors.ErrUnsupported) {
			// Without hole information everything counts as data.
			out = append(out, nbd.Extent{Length: end - pos})
			break
		}
		if err != nil {
			return nil, fmt.Errorf("disk: finding data after %d: %w", pos-base, err)
		}
		if !ok || data > pos {
			stop := end
			if ok {
				stop = min(data, end)
			}
			out = append(out, nbd.Extent{Length: stop - pos, Hole: true, Zero: true})
			pos = stop
			continue
		}
		hole, err := nextHole(f, pos)
		if err != nil {
			return nil, fmt.Errorf("disk: finding hole after %d: %w", pos-base, err)
		}
		if hole <= pos {
			return nil, fmt.Errorf("disk: lseek(SEEK_HOLE, %d) = %d made no progress", pos, hole)
		}
		stop := min(hole, end)
		out = append(out, nbd.Extent{Length: stop - pos})
		pos = stop
	}
	return out, nil
}

func alignUp(n, a int64) int64   { return (n + a - 1) / a * a }
func alignDown(n, a int64) int64 { return n / a * a }
