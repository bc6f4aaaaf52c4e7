package cluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
)

// RunInNode runs one of the project's CLIs inside a node's network namespace, as an operator
// on a node (or a host-network pod) would: it reaches the API server through the port the
// node forwards to it and, unlike Run on the host, the other nodes' addresses on the
// underlay, where the agents serve. It uses an admin kubeconfig and returns stdout and stderr
// apart, so that JSON output stays parseable. The process is killed when ctx ends.
func (c *Cluster) RunInNode(ctx context.Context, node, bin string, args ...string) (stdout, stderr string, err error) {
	n := c.Node(node)
	if n == nil {
		return "", "", fmt.Errorf("run %s in node %s: no such node", bin, node)
	}
	kc, err := c.nodeKubeconfig()
	if err != nil {
		return "", "", err
	}
	cmd := n.NS.Command(ctx, c.Bin(bin), append([]string{"--kubeconfig", kc}, args...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// nodeKubeconfig writes (once) and returns an admin kubeconfig for tools inside a node's
// namespace: the API server as the node reaches it.
func (c *Cluster) nodeKubeconfig() (string, error) {
	p := filepath.Join(c.dir, "node-admin.kubeconfig")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	token, err := c.adminToken()
	if err != nil {
		return "", err
	}
	return p, c.writeNodeKubeconfig(p, fmt.Sprintf("https://127.0.0.1:%d", apiPortInNode), token)
}
