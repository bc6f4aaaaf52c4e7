package manifests

import (
	"os"
	"strings"
	"testing"

	"github.com/meshcrypt/meshcrypt/tests/internal/helpcheck"
)

func TestMain(m *testing.M) {
	code := m.Run()
	helpcheck.Cleanup()
	os.Exit(code)
}

// TestAgentArgs: every flag the chart passes to the agent (defaults and every value set)
// exists in meshcrypt-agent.
func TestAgentArgs(t *testing.T) {
	for _, v := range []struct {
		name   string
		values map[string]any
	}{{"defaults", nil}, {"all values", readValues(t, allValuesFile)}} {
		ds := find(t, parseObjects(t, v.name, []byte(mustRender(t, renderOptions{values: v.values}))), "DaemonSet")
		ctr := nested[map[string]any](t, ds, "spec", "template", "spec", "containers", "0")
		if ctr["command"] != nil {
			t.Errorf("%s: the DaemonSet overrides the image's entrypoint", v.name)
		}
		if err := helpcheck.Check(t, "meshcrypt-agent", toStrings(ctr["args"])); err != nil {
			hint := ""
			if strings.Contains(err.Error(), "--metrics-addr") {
				hint = " (the agent must serve pkg/metrics's Server on --metrics-addr, default \":9962\"; the probes and the metrics Service use it)"
			}
			t.Errorf("%s: the DaemonSet's agent arguments: %v%s", v.name, err, hint)
		}
	}
}
