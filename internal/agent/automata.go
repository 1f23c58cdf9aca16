package agent

import (
	"context"
	"fmt"

	"github.com/vmbond/vmbond/internal/proto"
	"github.com/vmbond/vmbond/internal/qmp"
)

// automaton is the fixed sequence of QMP commands one operation issues. The
// agent has no other way to reach QEMU: no raw QMP passes through it, and an
// operation outside this table is refused before anything reaches QEMU.
type automaton struct {
	steps []string
	// running reports whether the operation needs a running QEMU.
	running bool
}

// automatonFor returns the automaton of op. Operations that never touch QMP
// (console, delete of a stopped VM) have an empty sequence.
func automatonFor(op string) (automaton, bool) {
	switch op {
	case proto.OpStart:
		// QEMU is launched with -S; the guest runs only after this sequence.
		return automaton{steps: []string{"query-status", "cont", "query-status"}}, true
	case proto.OpStatus:
		return automaton{steps: []string{"query-status"}}, true
	case proto.OpPause:
		return automaton{steps: []string{"stop", "query-status"}, running: true}, true
	case proto.OpResume:
		return automaton{steps: []string{"cont", "query-status"}, running: true}, true
	case proto.OpReset:
		return automaton{steps: []string{"system_reset", "query-status"}, running: true}, true
	case proto.OpShutdown:
		return automaton{steps: []string{"system_powerdown"}, running: true}, true
	case proto.OpStop:
		return automaton{steps: []string{"quit"}, running: true}, true
	case proto.OpConsole:
		return automaton{}, true
	case proto.OpDelete:
		return automaton{steps: []string{"quit"}}, true
	case proto.OpRestore, proto.OpPurge:
		// Bookkeeping on a deleted (stopped) VM: nothing reaches QEMU.
		return automaton{}, true
	}
	return automaton{}, false
}

// runAutomaton issues exactly the steps of a, in order, on mon, and returns
// the last run state QEMU reported ("" if the sequence has no query-status).
// Issuing each step from the table, not from the caller, is what makes the
// sequence fixed: a step cannot be skipped, repeated or replaced.
func runAutomaton(ctx context.Context, mon *qmp.Monitor, op string, a automaton) (string, error) {
	state := ""
	for i, step := range a.steps {
		var err error
		switch step {
		case "query-status":
			var st qmp.StatusInfo
			st, err = mon.Status(ctx)
			state = st.Status
		case "quit":
			err = mon.Quit(ctx)
			state = "shutdown"
		default:
			err = mon.Execute(ctx, step, nil, nil)
		}
		if err != nil {
			return state, fmt.Errorf("%s: step %d (%s): %w", op, i+1, step, err)
		}
	}
	return state, nil
}
