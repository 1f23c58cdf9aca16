package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"

	"github.com/vmbond/vmbond/internal/audit"
)

// tamperAudit re-enrols host behind a proxy that rewrites the log the agent
// hands out, as a hostile server (which stores the collected logs) could.
func (c *cluster) tamperAudit(host string, edit func(lines [][]byte) [][]byte) {
	c.t.Helper()
	target, _ := url.Parse(c.agents[host].URL)
	p := httptest.NewServer(&httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		ModifyResponse: func(r *http.Response) error {
			if r.Request.URL.Path != "/v1/audit" {
				return nil
			}
			raw, _ := io.ReadAll(r.Body)
			var b audit.Bundle
			json.Unmarshal(raw, &b)
			lines := bytes.SplitAfter(b.Log, []byte("\n"))
			if len(lines[len(lines)-1]) == 0 {
				lines = lines[:len(lines)-1]
			}
			b.Log = bytes.Join(edit(lines), nil)
			out, _ := json.Marshal(b)
			r.Body = io.NopCloser(bytes.NewReader(out))
			r.ContentLength = int64(len(out))
			r.Header.Del("Content-Length")
			return nil
		},
	})
	c.t.Cleanup(p.Close)
	if _, err := c.admin.AddHost(context.Background(), p.URL); err != nil {
		c.t.Fatal(err)
	}
}

// TestAuditVerify: `audit verify` passes on honest logs and names an
// altered, a dropped, a reordered and a forged entry.
func TestAuditVerify(t *testing.T) {
	c := newCluster(t, "host1", "host2")
	alice := c.tenant("alice")
	ctx := context.Background()
	vk := blankVM(t, alice, "web", "host1")
	blankVM(t, alice, "db", "host2")
	for range 3 {
		if _, err := alice.Command(ctx, "web", "status"); err != nil {
			t.Fatal(err)
		}
	}
	res, err := c.admin.VerifyAudit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 || !res[0].OK || !res[1].OK {
		t.Fatalf("honest logs: %+v", res)
	}

	tests := []struct {
		name string
		edit func(lines [][]byte) [][]byte
		want string
	}{
		{"altered", func(l [][]byte) [][]byte {
			l[3] = bytes.Replace(l[3], []byte(`"decision":"allowed"`), []byte(`"decision":"refused"`), 1)
			return l
		}, "entry 4"},
		{"dropped", func(l [][]byte) [][]byte { return append(l[:2:2], l[3:]...) }, "entry 3"},
		{"reordered", func(l [][]byte) [][]byte {
			l[2], l[3] = l[3], l[2]
			return l
		}, "entry 3"},
		{"forged", func(l [][]byte) [][]byte {
			// A well-formed entry appended with a correct chain hash: only
			// the agent's signature can tell it is not the agent's.
			last := l[len(l)-1]
			var seq uint64
			fmt.Sscanf(string(last), `{"seq":%d`, &seq)
			prev := entryHash(t, last)
			body := `"time":"2026-01-01T00:00:00Z","host":"host1","actor":"tenant:alice","vm":"` + vk.ID + `","op":"delete","decision":"allowed","salt":"00000000000000000000000000000000"}`
			return append(l, []byte(fmt.Sprintf(`{"seq":%d,"prev":"%s",%s`+"\n", seq+1, prev, body)))
		}, fmt.Sprintf("entry")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c.tamperAudit("host1", tt.edit)
			res, err := c.admin.VerifyAudit(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, h := range res {
				switch h.Host {
				case "host1":
					if h.OK || !strings.Contains(h.Error, tt.want) {
						t.Fatalf("tampered log of host1: ok=%v %q; want an error naming %q", h.OK, h.Error, tt.want)
					}
					t.Logf("%s: %s", tt.name, h.Error)
				case "host2":
					if !h.OK {
						t.Fatalf("host2's honest log failed: %s", h.Error)
					}
				}
			}
		})
	}

	// The tenant's own view verifies and shows only its VM's events.
	evs, rep, err := alice.VMAudit(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) < 4 || rep.Redacted == 0 {
		t.Fatalf("tenant view: %d events, %d redacted", len(evs), rep.Redacted)
	}
}

// entryHash computes an audit line's entry hash as the format documents it.
func entryHash(t *testing.T, line []byte) string {
	t.Helper()
	var seq uint64
	var prevHex string
	if _, err := fmt.Sscanf(string(line), `{"seq":%d,"prev":"%64s",`, &seq, &prevHex); err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(line, []byte(prevHex)) + 64 + 2
	body := bytes.TrimRight(line[i:], "\n")
	bh := sha256.Sum256(body)
	prev, _ := hex.DecodeString(prevHex)
	h := sha256.New()
	h.Write([]byte("vmbond-audit-v1\n"))
	var n [8]byte
	for k := range 8 {
		n[k] = byte(seq >> (56 - 8*k))
	}
	h.Write(n[:])
	h.Write(prev)
	h.Write(bh[:])
	return hex.EncodeToString(h.Sum(nil))
}
