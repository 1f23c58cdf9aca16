package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/nbd"
	"github.com/vmbond/vmbond/internal/proto"
	"github.com/vmbond/vmbond/internal/qmp"
)

// vm is a registered VM: its authenticated spec, its disk key (in memory
// only) and, while it runs, its QEMU process, monitor and disk export.
type vm struct {
	spec    *proto.VMSpec
	diskKey []byte
	keys    *bond.Keys
	dir     string

	opMu sync.Mutex // one operation at a time

	mu  sync.Mutex // guards rec and run
	rec *record
	run *runtime
}

type runtime struct {
	cmd       *exec.Cmd // nil when reattached after an agent restart
	mon       *qmp.Monitor
	disk      io.Closer
	stopNBD   context.CancelFunc
	nbdDone   chan struct{}
	exited    chan struct{}
	detaching bool
}

func (v *vm) diskPath() string    { return filepath.Join(v.dir, "disk.img") }
func (v *vm) consolePath() string { return filepath.Join(v.dir, "console.log") }

func (v *vm) running() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.run != nil
}

func (a *Agent) sockets(name string) (qmpSock, nbdSock string) {
	return filepath.Join(a.cfg.RunDir, name+".qmp"), filepath.Join(a.cfg.RunDir, name+".nbd")
}

// checkBootFiles verifies the pinned hashes of a kernel-boot VM's files.
func (v *vm) checkBootFiles() error {
	if v.spec.Boot.Mode != proto.BootKernel {
		return nil
	}
	for _, f := range []struct{ name, want string }{{"kernel", v.spec.Boot.KernelSHA256}, {"initrd", v.spec.Boot.InitrdSHA256}} {
		if f.want == "" {
			continue
		}
		got, err := fsutil.SHA256File(filepath.Join(v.dir, f.name))
		if err != nil {
			return fmt.Errorf("%s: %w", f.name, err)
		}
		if got != f.want {
			return fmt.Errorf("%s has SHA-256 %s but the tenant's spec pins %s: substituted", f.name, got, f.want)
		}
	}
	return nil
}

// serveDisk opens the VM's encrypted image with its key and exports it on the
// VM's NBD socket. Opening checks the key against the LUKS header, so a disk
// the operator substituted is refused here.
func (a *Agent) serveDisk(v *vm, rt *runtime) error {
	d, err := disk.Open(v.diskPath(), v.diskKey)
	if err != nil {
		return fmt.Errorf("open disk of %s: %w", v.spec.VM, err)
	}
	if d.Size() != v.spec.DiskSize {
		d.Close()
		return fmt.Errorf("disk of %s holds %d bytes but the spec says %d", v.spec.VM, d.Size(), v.spec.DiskSize)
	}
	_, sock := a.sockets(v.spec.VM)
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		d.Close()
		return fmt.Errorf("listen for disk of %s: %w", v.spec.VM, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := &nbd.Server{Backend: d, Name: v.spec.VM, Logger: a.log.With("vm", v.spec.VM, "part", "nbd")}
	rt.disk, rt.stopNBD, rt.nbdDone = d, cancel, make(chan struct{})
	go func() {
		defer close(rt.nbdDone)
		srv.Serve(ctx, l)
	}()
	return nil
}

func (rt *runtime) closeDisk() {
	if rt.stopNBD != nil {
		rt.stopNBD()
		<-rt.nbdDone
	}
	if rt.disk != nil {
		rt.disk.Close()
	}
}

func (a *Agent) qemuArgs(v *vm) []string {
	qmpSock, nbdSock := a.sockets(v.spec.VM)
	accel := "tcg"
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
		f.Close()
		accel = "kvm"
	}
	args := []string{
		"-name", "vmbond-" + v.spec.VM,
		"-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
		"-accel", accel,
		"-m", strconv.Itoa(v.spec.MemoryMiB),
		"-smp", strconv.Itoa(v.spec.CPUs),
		"-chardev", "file,id=con0,path=" + v.consolePath(),
		"-serial", "chardev:con0",
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
		// QEMU reconnects to its disk if the agent restarts.
		"-blockdev", "driver=nbd,node-name=disk0,export=" + v.spec.VM + ",server.type=unix,server.path=" + nbdSock + ",reconnect-delay=60",
		"-device", "virtio-blk-pci,drive=disk0",
		"-S",
	}
	if v.spec.Boot.Mode == proto.BootKernel {
		args = append(args, "-kernel", filepath.Join(v.dir, "kernel"), "-append", v.spec.Boot.Cmdline)
		if v.spec.Boot.InitrdSHA256 != "" {
			args = append(args, "-initrd", filepath.Join(v.dir, "initrd"))
		}
	}
	return args
}

// start launches QEMU paused, connects its monitor and runs the start
// automaton. The caller holds v.opMu.
func (a *Agent) start(ctx context.Context, v *vm) (string, error) {
	if v.running() {
		return "", errors.New("VM is already running")
	}
	if err := v.checkBootFiles(); err != nil {
		return "", err
	}
	rt := &runtime{exited: make(chan struct{})}
	if err := a.serveDisk(v, rt); err != nil {
		return "", err
	}
	qmpSock, _ := a.sockets(v.spec.VM)
	os.Remove(qmpSock)
	logf, err := os.OpenFile(filepath.Join(v.dir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		rt.closeDisk()
		return "", err
	}
	os.Remove(v.consolePath())
	cmd := exec.Command(a.cfg.QEMU, a.qemuArgs(v)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: QEMU outlives an agent restart.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		rt.closeDisk()
		return "", fmt.Errorf("launch QEMU: %w", err)
	}
	logf.Close()
	rt.cmd = cmd
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	mon, err := dialMonitor(ctx, qmpSock, waited)
	if err != nil {
		cmd.Process.Kill()
		rt.closeDisk()
		out, _ := os.ReadFile(filepath.Join(v.dir, "qemu.log"))
		return "", fmt.Errorf("connect to QEMU monitor: %w (qemu said: %s)", err, lastLine(out))
	}
	rt.mon = mon
	aut, _ := automatonFor(proto.OpStart)
	state, err := runAutomaton(ctx, mon, proto.OpStart, aut)
	if err != nil {
		mon.Close()
		cmd.Process.Kill()
		rt.closeDisk()
		return "", err
	}
	v.mu.Lock()
	v.run = rt
	v.rec.Running, v.rec.PID = true, cmd.Process.Pid
	v.mu.Unlock()
	go a.watch(v, rt, waited)
	return state, nil
}

func dialMonitor(ctx context.Context, sock string, exited <-chan error) (*qmp.Monitor, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		mon, err := qmp.Dial(ctx, sock)
		if err == nil {
			return mon, nil
		}
		select {
		case werr := <-exited:
			return nil, fmt.Errorf("QEMU exited: %v", werr)
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return nil, err
		}
	}
}

func lastLine(b []byte) string {
	s := string(b)
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			return s[i+1:]
		}
	}
	return s
}

// watch waits for QEMU to exit (its monitor closes) and releases the disk.
// waited is nil for a process reattached after an agent restart.
func (a *Agent) watch(v *vm, rt *runtime, waited <-chan error) {
	<-rt.mon.Done()
	v.mu.Lock()
	detaching := rt.detaching
	v.mu.Unlock()
	if detaching {
		return
	}
	if waited != nil {
		<-waited
	} else {
		for pid := v.rec.PID; pid > 0 && syscall.Kill(pid, 0) == nil; {
			time.Sleep(100 * time.Millisecond)
		}
	}
	rt.closeDisk()
	v.mu.Lock()
	if v.run == rt {
		v.run = nil
		v.rec.Running, v.rec.PID = false, 0
		if err := a.store.put(v.spec.VM, v.rec); err != nil {
			a.log.Error("save VM state", "vm", v.spec.VM, "err", err)
		}
	}
	v.mu.Unlock()
	close(rt.exited)
	a.log.Info("VM stopped", "vm", v.spec.VM)
}

// reattach reconnects to a QEMU that outlived a previous agent process.
func (a *Agent) reattach(ctx context.Context, v *vm) error {
	if v.rec.PID <= 0 || syscall.Kill(v.rec.PID, 0) != nil {
		return errors.New("QEMU process is gone")
	}
	rt := &runtime{exited: make(chan struct{})}
	if err := a.serveDisk(v, rt); err != nil {
		return err
	}
	qmpSock, _ := a.sockets(v.spec.VM)
	mon, err := qmp.Dial(ctx, qmpSock)
	if err != nil {
		rt.closeDisk()
		return fmt.Errorf("reconnect to QEMU monitor: %w", err)
	}
	rt.mon = mon
	v.mu.Lock()
	v.run = rt
	v.mu.Unlock()
	go a.watch(v, rt, nil)
	a.log.Info("reattached to running VM", "vm", v.spec.VM, "pid", v.rec.PID)
	return nil
}

// detach lets go of a running VM without stopping it.
func (v *vm) detach() {
	v.mu.Lock()
	rt := v.run
	if rt != nil {
		rt.detaching = true
	}
	v.mu.Unlock()
	if rt == nil {
		return
	}
	rt.mon.Close()
	rt.closeDisk()
}

// operate runs op on a VM and returns QEMU's run state afterwards. The caller
// has already authorised op. It holds v.opMu.
func (a *Agent) operate(ctx context.Context, v *vm, op string) (state, output string, err error) {
	aut, ok := automatonFor(op)
	if !ok {
		return "", "", fmt.Errorf("operation %q is not in the command automata", op)
	}
	if v.deletedAt() != nil {
		return a.operateDeleted(v, op)
	}
	switch op {
	case proto.OpRestore, proto.OpPurge:
		return v.stateName(), "", errors.New("VM is not deleted")
	case proto.OpStart:
		state, err = a.start(ctx, v)
		return state, "", err
	case proto.OpConsole:
		out, err := tail(v.consolePath(), 64<<10)
		return v.stateName(), out, err
	case proto.OpDelete:
		return a.deleteVM(ctx, v)
	}
	v.mu.Lock()
	rt := v.run
	v.mu.Unlock()
	if rt == nil {
		if aut.running {
			return "stopped", "", errors.New("VM is not running")
		}
		return v.stateName(), "", nil
	}
	state, err = runAutomaton(ctx, rt.mon, op, aut)
	if err != nil && op == proto.OpStatus {
		// The guest powered off while we asked: QEMU is exiting.
		select {
		case <-rt.exited:
			return "stopped", "", nil
		case <-time.After(5 * time.Second):
		}
	}
	if op == proto.OpStop && err == nil {
		select {
		case <-rt.exited:
		case <-time.After(15 * time.Second):
			return state, "", errors.New("QEMU did not exit after quit")
		}
		state = "stopped"
	}
	return state, "", err
}

// stateName is the public state when no QMP query is made.
func (v *vm) stateName() string {
	if v.deletedAt() != nil {
		return "deleted"
	}
	if v.running() {
		return "running"
	}
	return "stopped"
}

func tail(path string, n int64) (string, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
		return "", err
	}
	return string(b), nil
}
