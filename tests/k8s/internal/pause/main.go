// Command pause is the sandbox (pause) image's only program, as registry.k8s.io/pause's: it
// holds the pod's namespaces, reaps the children that end up with it (it is PID 1 when the
// pod shares its PID namespace) and exits on SIGTERM or SIGINT. Static, no dependencies.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
