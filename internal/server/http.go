package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// apiError is an error answer: HTTP status, proto code and a message for the
// caller. cause, if any, is logged but not sent.
type apiError struct {
	status int
	code   string
	msg    string
	cause  error
}

func (e *apiError) Error() string {
	if e.cause != nil {
		return e.msg + ": " + e.cause.Error()
	}
	return e.msg
}

func (e *apiError) Unwrap() error { return e.cause }

func errorf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

// internalError hides the cause from the caller and logs it.
func internalError(doing string, err error) *apiError {
	return &apiError{status: http.StatusInternalServerError, code: proto.CodeInternal, msg: "internal error while trying to " + doing, cause: err}
}

// unavailable reports an agent that could not be reached.
func unavailable(doing string, err error) *apiError {
	return &apiError{status: http.StatusBadGateway, code: proto.CodeUnavailable, msg: fmt.Sprintf("%s: %v", doing, err)}
}

// call is one request being handled: who made it and what to log about it.
type call struct {
	w     *statusWriter
	r     *http.Request
	who   caller
	attrs []any // decisions to log with the request's result
}

// note adds key/value pairs to the request's log line.
func (c *call) note(args ...any) { c.attrs = append(c.attrs, args...) }

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.Marshal(proto.Error{Code: proto.CodeInternal, Message: "encode answer"})
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", fmt.Sprint(len(b)+1))
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.status, proto.Error{Code: e.code, Message: e.msg})
}

// handle registers h for pattern, behind authentication for need, with one
// log line per request: who, what, result and the handler's decisions.
func (s *Server) handle(mux *http.ServeMux, pattern string, need role, h func(*call) error) {
	mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		c := &call{w: &statusWriter{ResponseWriter: w}, r: r}
		err := func() error {
			if need != roleNone {
				who, aerr := s.authenticate(r)
				if aerr != nil {
					return aerr
				}
				c.who = who
				if aerr := authorize(who, need); aerr != nil {
					return aerr
				}
			}
			return h(c)
		}()
		level := slog.LevelInfo
		attrs := []any{"who", c.who.String(), "method", r.Method, "path", r.URL.Path}
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) {
				ae = internalError("handle "+pattern, err)
			}
			if c.w.status == 0 {
				writeError(c.w, ae)
			}
			level = slog.LevelWarn
			if ae.status >= 500 {
				level = slog.LevelError
			}
			attrs = append(attrs, "error", ae.Error())
		}
		if err == nil && c.w.status >= 400 {
			level = slog.LevelWarn // an agent's refusal, relayed
		}
		attrs = append(attrs, "status", c.w.status, "duration", time.Since(start).Round(time.Microsecond))
		attrs = append(attrs, c.attrs...)
		s.log.Log(r.Context(), level, "request", attrs...)
	})
}

// readBody reads a JSON request body of at most proto.MaxBody bytes.
func readBody(c *call) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(c.w, c.r.Body, proto.MaxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "request body is larger than %d bytes", proto.MaxBody)
		}
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "read request body: %v", err)
	}
	return body, nil
}

// decodeBody reads and strictly decodes a JSON request body into v; what
// names the message for the error text.
func decodeBody(c *call, what string, v any) ([]byte, error) {
	body, err := readBody(c)
	if err != nil {
		return nil, err
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "empty request body: want a JSON %s", what)
	}
	if err := proto.DecodeStrict(body, v); err != nil {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid %s JSON: %v", what, err)
	}
	return body, nil
}

// pathID reads and validates an identifier from the request path.
func pathID(c *call, name, kind string) (string, error) {
	id := c.r.PathValue(name)
	if err := proto.ValidID(kind, id); err != nil {
		return "", errorf(http.StatusBadRequest, proto.CodeBadRequest, "%v", err)
	}
	return id, nil
}

// captureWriter records what the mux's own 404/405/redirect handler writes,
// so that errors can be answered as JSON like every other error.
type captureWriter struct {
	header http.Header
	status int
	body   bytes.Buffer
}

func (w *captureWriter) Header() http.Header { return w.header }
func (w *captureWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
}
func (w *captureWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.body.Write(b)
}

// jsonMux serves mux, turning its plain-text 404 and 405 into proto.Error.
func (s *Server) jsonMux(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h, pattern := mux.Handler(r)
		if pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		cw := &captureWriter{header: http.Header{}}
		h.ServeHTTP(cw, r)
		switch cw.status {
		case http.StatusNotFound:
			s.log.Warn("request", "method", r.Method, "path", r.URL.Path, "status", cw.status, "error", "no such route")
			writeError(w, errorf(http.StatusNotFound, proto.CodeNotFound, "no route for %s %s", r.Method, r.URL.Path))
		case http.StatusMethodNotAllowed:
			s.log.Warn("request", "method", r.Method, "path", r.URL.Path, "status", cw.status, "error", "method not allowed")
			if allow := cw.header.Get("Allow"); allow != "" {
				w.Header().Set("Allow", allow)
			}
			writeError(w, errorf(http.StatusMethodNotAllowed, proto.CodeBadRequest, "method %s not allowed for %s (allowed: %s)", r.Method, r.URL.Path, cw.header.Get("Allow")))
		default:
			for k, v := range cw.header {
				w.Header()[k] = v
			}
			w.WriteHeader(cw.status)
			w.Write(cw.body.Bytes())
		}
	})
}
