package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// maxAgentAnswer bounds what the server reads of an agent's answer.
const maxAgentAnswer = 16 << 20

// inventoryTimeout bounds the inventory look-up behind GET /v1/vms, so that
// one dead host does not stall the listing.
const inventoryTimeout = 5 * time.Second

// agentClient talks to host agents over HTTP. Everything it sends and
// receives is public data, ciphertext or authenticated bytes it passes on.
type agentClient struct {
	http    *http.Client
	timeout time.Duration
}

func newAgentClient(timeout time.Duration) *agentClient {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = timeout
	return &agentClient{
		http: &http.Client{
			Transport: tr,
			// An agent's redirect is relayed, never followed.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		timeout: timeout,
	}
}

func (a *agentClient) close() { a.http.CloseIdleConnections() }

// agentAnswer is an agent's HTTP answer, kept verbatim for relaying.
type agentAnswer struct {
	status      int
	contentType string
	body        []byte
}

func (ans *agentAnswer) ok() bool { return ans.status >= 200 && ans.status < 300 }

// describe summarises a non-2xx answer for logs and error messages.
func (ans *agentAnswer) describe() string {
	var e proto.Error
	if err := proto.DecodeStrict(ans.body, &e); err == nil && e.Code != "" {
		return fmt.Sprintf("agent answered %d %s: %s", ans.status, e.Code, e.Message)
	}
	b := ans.body
	if len(b) > 200 {
		b = b[:200]
	}
	return fmt.Sprintf("agent answered %d: %q", ans.status, b)
}

// relay writes the agent's answer to w verbatim: status, content type, body.
func (ans *agentAnswer) relay(w http.ResponseWriter) {
	if ans.contentType != "" {
		w.Header().Set("Content-Type", ans.contentType)
	}
	w.Header().Set("Content-Length", fmt.Sprint(len(ans.body)))
	w.WriteHeader(ans.status)
	w.Write(ans.body)
}

// agentURL joins an agent's base URL and a path.
func agentURL(base, path string) string { return strings.TrimRight(base, "/") + path }

// do sends one request with an in-memory body (nil for none) and reads the
// whole answer, within the agent timeout.
func (a *agentClient) do(ctx context.Context, method, url string, body []byte, timeout time.Duration) (*agentAnswer, error) {
	return a.doLimit(ctx, method, url, body, timeout, maxAgentAnswer)
}

// doLimit is do reading at most limit bytes of the answer.
func (a *agentClient) doLimit(ctx context.Context, method, url string, body []byte, timeout time.Duration, limit int64) (*agentAnswer, error) {
	if timeout <= 0 || timeout > a.timeout {
		timeout = a.timeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	return a.send(req, limit)
}

func (a *agentClient) send(req *http.Request, limit int64) (*agentAnswer, error) {
	resp, err := a.http.Do(req)
	if err != nil {
		if cause := context.Cause(req.Context()); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%v)", err, cause)
		}
		return nil, fmt.Errorf("%s %s: %w", req.Method, req.URL.Redacted(), err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", req.Method, req.URL.Redacted(), err)
	}
	if int64(len(body)) > limit {
		return nil, fmt.Errorf("%s %s: answer larger than %d bytes", req.Method, req.URL.Redacted(), limit)
	}
	return &agentAnswer{status: resp.StatusCode, contentType: resp.Header.Get("Content-Type"), body: body}, nil
}

// errStalled cancels a streamed upload that made no progress for the
// agent timeout.
var errStalled = errors.New("upload to agent stalled")

// stallReader cancels its context when Read is not called for too long.
type stallReader struct {
	r     io.Reader
	timer *time.Timer
	wait  time.Duration
}

func (s *stallReader) Read(p []byte) (int, error) {
	s.timer.Reset(s.wait)
	return s.r.Read(p)
}

// push streams a file to the agent with PUT, Content-Length set. The agent
// timeout bounds each stall, not the whole transfer, so that large images
// can take as long as they need while a dead agent is still noticed.
func (a *agentClient) push(ctx context.Context, url string, f *os.File, size int64) (*agentAnswer, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	timer := time.AfterFunc(a.timeout, func() { cancel(errStalled) })
	defer timer.Stop()
	body := &stallReader{r: io.NewSectionReader(f, 0, size), timer: timer, wait: a.timeout}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, url, io.NopCloser(body))
	if err != nil {
		return nil, fmt.Errorf("PUT %s: %w", url, err)
	}
	req.ContentLength = size
	if size == 0 {
		req.Body = http.NoBody
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	ans, err := a.send(req, maxAgentAnswer)
	return ans, err
}

// identity fetches an agent's host certificate from GET {base}/v1/identity
// and reads the host id from its body. The signature is not checked here:
// the server vouches for nothing, clients verify certificates themselves.
func (a *agentClient) identity(ctx context.Context, base string) (proto.HostCert, *proto.HostCertBody, error) {
	ans, err := a.do(ctx, http.MethodGet, agentURL(base, "/v1/identity"), nil, 0)
	if err != nil {
		return proto.HostCert{}, nil, err
	}
	if !ans.ok() {
		return proto.HostCert{}, nil, errors.New(ans.describe())
	}
	var cert proto.HostCert
	if err := json.Unmarshal(ans.body, &cert); err != nil {
		return proto.HostCert{}, nil, fmt.Errorf("decode host certificate: %w", err)
	}
	var body proto.HostCertBody
	if err := json.Unmarshal(cert.Body, &body); err != nil {
		return proto.HostCert{}, nil, fmt.Errorf("decode host certificate body: %w", err)
	}
	if err := proto.ValidID("host", body.Identity.HostID); err != nil {
		return proto.HostCert{}, nil, fmt.Errorf("host certificate: %w", err)
	}
	return cert, &body, nil
}

// inventory fetches an agent's public VM list from GET {base}/v1/vms.
// Agent answers are decoded leniently (unknown fields allowed) so that a
// newer agent still lists; the server only displays them.
func (a *agentClient) inventory(ctx context.Context, base string) ([]proto.VMState, error) {
	ans, err := a.do(ctx, http.MethodGet, agentURL(base, "/v1/vms"), nil, inventoryTimeout)
	if err != nil {
		return nil, err
	}
	if !ans.ok() {
		return nil, errors.New(ans.describe())
	}
	var list []proto.VMState
	if err := json.Unmarshal(ans.body, &list); err != nil {
		return nil, fmt.Errorf("decode agent inventory: %w", err)
	}
	return list, nil
}
