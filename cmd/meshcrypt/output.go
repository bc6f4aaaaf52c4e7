package main

import (
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshcrypt/meshcrypt/pkg/status"
)

// outputFormats are the formats of -o (status, identities, keys status).
var outputFormats = []string{"table", "json", "yaml"}

// addOutputFlag registers -o (default table, with completion) on cmd, into format.
func addOutputFlag(cmd *cobra.Command, format *string) {
	cmd.Flags().StringVarP(format, "output", "o", "table", "output format: "+strings.Join(outputFormats, ", "))
	_ = cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(outputFormats, cobra.ShellCompDirectiveNoFileComp))
}

// checkOutput refuses an unknown -o before anything is read from the cluster.
func checkOutput(format string) error {
	if !slices.Contains(outputFormats, format) {
		return fmt.Errorf("-o %q: want one of %s", format, strings.Join(outputFormats, ", "))
	}
	return nil
}

// writeOutput writes v as JSON or YAML, or with table for "table".
func writeOutput(w io.Writer, format string, v any, table func(io.Writer) error) error {
	switch format {
	case "json":
		return status.WriteJSON(w, v)
	case "yaml":
		return status.WriteYAML(w, v)
	}
	return table(w)
}
