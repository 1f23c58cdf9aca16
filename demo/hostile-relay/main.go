// Command hostile-relay is a demo-only simulation of a compromised management
// server: a relay between the server and an agent that redirects one VM's
// commands to another VM. vmbond's agent refuses them and the tenant's client
// reports the redirection. It is not part of vmbond.
package main

import (
	"flag"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:7009", "address to listen on")
	agent := flag.String("agent", "http://127.0.0.1:7001", "the real agent")
	from := flag.String("from", "", "VM ID whose commands are redirected")
	to := flag.String("to", "", "VM ID they are sent to instead")
	flag.Parse()
	target, err := url.Parse(*agent)
	if err != nil || *from == "" || *to == "" {
		log.Fatal("usage: hostile-relay -agent URL -from VMID -to VMID")
	}
	proxy := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target)
		if strings.HasSuffix(pr.Out.URL.Path, "/command") && strings.Contains(pr.Out.URL.Path, *from) {
			pr.Out.URL.Path = strings.Replace(pr.Out.URL.Path, *from, *to, 1)
			log.Printf("hostile relay: redirecting a command for %s to %s", *from, *to)
		}
	}}
	log.Fatal(http.ListenAndServe(*listen, proxy))
}
