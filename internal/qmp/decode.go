package qmp

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// kind says which of the four QMP server messages a line holds.
type kind int

const (
	kindGreeting kind = iota + 1
	kindReturn
	kindError
	kindEvent
)

// reply is one decoded line from QEMU.
type reply struct {
	kind kind

	// Greeting.
	version Version

	// Return and error responses. id is valid only if hasID is set: a
	// response whose id is absent or not one this package could have sent
	// matches no request.
	id    uint64
	hasID bool
	ret   json.RawMessage
	err   *Error

	// Event.
	event Event
}

// decodeReply decodes one line QEMU sent. It takes untrusted bytes: every
// malformed, ambiguous or unknown message is an error wrapping ErrProtocol,
// never a panic. Member names are matched exactly, as QMP specifies, and
// unknown members are ignored.
func decodeReply(line []byte) (reply, error) {
	var members map[string]json.RawMessage
	if err := json.Unmarshal(line, &members); err != nil {
		return reply{}, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	if members == nil {
		return reply{}, fmt.Errorf("%w: message is not a JSON object", ErrProtocol)
	}

	var r reply
	n := 0
	for name, k := range map[string]kind{"QMP": kindGreeting, "return": kindReturn, "error": kindError, "event": kindEvent} {
		if _, ok := members[name]; ok {
			r.kind = k
			n++
		}
	}
	switch n {
	case 0:
		return reply{}, fmt.Errorf("%w: message is neither greeting, response nor event", ErrProtocol)
	case 1:
	default:
		return reply{}, fmt.Errorf("%w: message has %d of the members QMP, return, error and event", ErrProtocol, n)
	}

	switch r.kind {
	case kindGreeting:
		var g *struct {
			Version struct {
				QEMU struct {
					Major int `json:"major"`
					Minor int `json:"minor"`
					Micro int `json:"micro"`
				} `json:"qemu"`
				Package string `json:"package"`
			} `json:"version"`
		}
		if err := json.Unmarshal(members["QMP"], &g); err != nil {
			return reply{}, fmt.Errorf("%w: greeting: %w", ErrProtocol, err)
		}
		if g == nil {
			return reply{}, fmt.Errorf("%w: greeting is null", ErrProtocol)
		}
		v := g.Version
		r.version = Version{Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro, Package: v.Package}

	case kindReturn, kindError:
		if raw, ok := members["id"]; ok {
			// Requests carry decimal ids; anything else matches none.
			if id, err := strconv.ParseUint(string(raw), 10, 64); err == nil {
				r.id, r.hasID = id, true
			}
		}
		if r.kind == kindReturn {
			r.ret = members["return"]
			break
		}
		if err := json.Unmarshal(members["error"], &r.err); err != nil {
			return reply{}, fmt.Errorf("%w: error response: %w", ErrProtocol, err)
		}
		if r.err == nil {
			return reply{}, fmt.Errorf("%w: error response is null", ErrProtocol)
		}

	case kindEvent:
		if err := json.Unmarshal(members["event"], &r.event.Name); err != nil {
			return reply{}, fmt.Errorf("%w: event name: %w", ErrProtocol, err)
		}
		if r.event.Name == "" {
			return reply{}, fmt.Errorf("%w: event without a name", ErrProtocol)
		}
		r.event.Data = members["data"]
		if raw, ok := members["timestamp"]; ok {
			var ts *struct {
				Seconds      int64 `json:"seconds"`
				Microseconds int64 `json:"microseconds"`
			}
			if err := json.Unmarshal(raw, &ts); err != nil {
				return reply{}, fmt.Errorf("%w: event %s timestamp: %w", ErrProtocol, r.event.Name, err)
			}
			if ts != nil {
				r.event.Time = time.Unix(ts.Seconds, 0).Add(time.Duration(ts.Microseconds) * time.Microsecond)
			}
		}
	}
	return r, nil
}

// decode stores a successful response's value in v (if v is not nil) or
// returns the QMP error.
func (r *reply) decode(v any) error {
	if r.err != nil {
		return r.err
	}
	if v == nil {
		return nil
	}
	if err := json.Unmarshal(r.ret, v); err != nil {
		return fmt.Errorf("decoding return value: %w", err)
	}
	return nil
}
