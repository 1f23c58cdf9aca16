// Command vmbond is the single binary of vmbond: the trusted host agent, the
// untrusted management server, and the tenant's and security officer's client
// verbs.
package main

import (
	"os"

	"github.com/vmbond/vmbond/internal/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:]))
}
