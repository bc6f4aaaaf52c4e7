package docs

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// command is a command line found in the docs.
type command struct {
	// Where is FILE:LINE.
	Where string
	// Bin is "meshcrypt", "meshcrypt-agent" or "make".
	Bin string
	// Args are the words after the binary (for make: the targets and variables).
	Args []string
	// Inline is true for inline code, false for a fenced code block.
	Inline bool
	// Planned is true for inline code in a paragraph, list item or table row that says
	// "planned": documented ahead of the code, not checked.
	Planned bool
}

func (c command) String() string {
	return strings.TrimSpace(c.Bin + " " + strings.Join(c.Args, " "))
}

// shellInfo are the info strings of fenced blocks that hold shell lines; "" is a block
// without one. Blocks of other languages (yaml, json, go, ...) are not commands.
var shellInfo = map[string]bool{"": true, "sh": true, "bash": true, "shell": true, "console": true, "zsh": true, "fish": true, "powershell": true, "ps1": true}

var (
	planned   = regexp.MustCompile(`(?i)\bplanned\b`)
	heredoc   = regexp.MustCompile(`<<-?\s*(?:'([A-Za-z_]+)'|"([A-Za-z_]+)"|([A-Za-z_]+))`)
	listStart = regexp.MustCompile(`^\s*(?:[-*+]|\d+[.)])\s`)
)

// extract returns the commands of the Markdown files, relative to root, in file order.
func extract(root string, files []string) ([]command, error) {
	var out []command
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			return nil, err
		}
		out = append(out, extractMarkdown(f, string(b))...)
	}
	return out, nil
}

// extractMarkdown finds the commands of one Markdown document named name.
func extractMarkdown(name, text string) []command {
	var out []command
	lines := strings.Split(text, "\n")
	var unit []string // the current paragraph, list item or table row
	unitStart := 0
	flush := func() {
		if len(unit) > 0 {
			out = append(out, inlineCommands(name, unitStart, unit)...)
		}
		unit = nil
	}
	fence := ""
	var cont strings.Builder
	contStart := 0
	heredocEnd := ""
	for i, l := range lines {
		trimmed := strings.TrimSpace(l)
		if fence == "" {
			if f := fenceOf(trimmed); f != "" {
				flush()
				fence = f
				info := strings.TrimSpace(strings.TrimLeft(trimmed, f[:1]))
				if fields := strings.Fields(info); len(fields) > 0 {
					info = fields[0]
				}
				if !shellInfo[info] {
					fence = "skip:" + f
				}
				continue
			}
			switch {
			case trimmed == "" || strings.HasPrefix(trimmed, "#") || strings.HasPrefix(trimmed, "|") || listStart.MatchString(l):
				flush()
				if trimmed != "" {
					unit, unitStart = []string{l}, i+1
				}
				if strings.HasPrefix(trimmed, "#") || strings.HasPrefix(trimmed, "|") {
					flush() // a heading or a table row is a unit of its own
				}
			default:
				if len(unit) == 0 {
					unitStart = i + 1
				}
				unit = append(unit, l)
			}
			continue
		}
		// Inside a fenced block.
		bare := strings.TrimPrefix(fence, "skip:")
		if strings.HasPrefix(trimmed, bare) && strings.Trim(trimmed, bare[:1]) == "" {
			fence, heredocEnd = "", ""
			cont.Reset()
			continue
		}
		if strings.HasPrefix(fence, "skip:") {
			continue
		}
		if heredocEnd != "" {
			if trimmed == heredocEnd {
				heredocEnd = ""
			}
			continue
		}
		if cont.Len() == 0 {
			contStart = i + 1
		}
		if strings.HasSuffix(trimmed, `\`) {
			cont.WriteString(strings.TrimSuffix(trimmed, `\`) + " ")
			continue
		}
		cont.WriteString(trimmed)
		line := cont.String()
		cont.Reset()
		if m := heredoc.FindStringSubmatch(line); m != nil {
			heredocEnd = m[1] + m[2] + m[3]
		}
		line = strings.TrimPrefix(line, "$ ")
		for _, c := range shellCommands(line, false) {
			c.Where = fmt.Sprintf("%s:%d", name, contStart)
			out = append(out, c)
		}
	}
	flush()
	return out
}

// fenceOf returns the fence that a line opens ("```", "~~~~", ...), or "".
func fenceOf(trimmed string) string {
	for _, ch := range []string{"`", "~"} {
		n := len(trimmed) - len(strings.TrimLeft(trimmed, ch))
		if n >= 3 {
			return strings.Repeat(ch, n)
		}
	}
	return ""
}

// inlineCommands finds the commands in the inline code of one unit of text (a paragraph,
// list item or table row) that starts at line start.
func inlineCommands(name string, start int, lines []string) []command {
	text := strings.Join(lines, "\n")
	isPlanned := planned.MatchString(text)
	var out []command
	for i := 0; i < len(text); {
		if text[i] != '`' {
			i++
			continue
		}
		n := len(text[i:]) - len(strings.TrimLeft(text[i:], "`"))
		delim := strings.Repeat("`", n)
		end := strings.Index(text[i+n:], delim)
		if end < 0 {
			break
		}
		code := text[i+n : i+n+end]
		line := start + strings.Count(text[:i], "\n")
		i += n + end + n
		code = strings.ReplaceAll(code, "\n", " ")
		code = strings.ReplaceAll(code, `\|`, "|")
		// Usage syntax: [--flag VALUE] brackets and ... are not part of a command line.
		code = strings.NewReplacer("[", " ", "]", " ", "...", " ", "…", " ").Replace(code)
		for _, c := range shellCommands(code, true) {
			c.Where = fmt.Sprintf("%s:%d", name, line)
			c.Inline = true
			c.Planned = isPlanned
			out = append(out, c)
		}
	}
	return out
}

// shellCommands returns the commands of interest in one shell line. In inline code a bare
// binary name ("the meshcrypt namespace", "meshcrypt-agent's log") is a name, not a command.
func shellCommands(line string, inline bool) []command {
	var out []command
	for _, words := range splitShell(line) {
		c, ok := recognise(words)
		if !ok || (inline && c.Bin != "make" && len(c.Args) == 0) {
			continue
		}
		out = append(out, c)
	}
	return out
}

// recognise tells whether a simple command runs meshcrypt, meshcrypt-agent or make.
func recognise(words []string) (command, bool) {
	for i := 0; i < len(words); i++ {
		w := words[i]
		if envAssignment.MatchString(w) || wrappers[w] {
			continue
		}
		switch filepath.Base(w) {
		case "meshcrypt", "kubectl-meshcrypt":
			return command{Bin: "meshcrypt", Args: words[i+1:]}, true
		case "meshcrypt-agent":
			return command{Bin: "meshcrypt-agent", Args: words[i+1:]}, true
		case "make":
			if filepath.Base(w) == w {
				return command{Bin: "make", Args: words[i+1:]}, true
			}
		case "kubectl":
			if i+1 < len(words) && words[i+1] == "meshcrypt" {
				return command{Bin: "meshcrypt", Args: words[i+2:]}, true
			}
			for j := i + 1; j < len(words); j++ {
				if words[j] == "--" {
					return recognise(words[j+1:])
				}
			}
		}
		return command{}, false
	}
	return command{}, false
}

var envAssignment = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// wrappers run the command that follows them.
var wrappers = map[string]bool{"sudo": true, "exec": true, "time": true, "watch": true, "command": true, "nohup": true}

// splitShell splits a shell line into the words of each simple command: it honours quotes,
// separates at ; | & ( ) and $( <(, drops redirections with their targets, and stops at a
// comment.
func splitShell(line string) [][]string {
	var cmds [][]string
	var words []string
	var w strings.Builder
	inWord, redirect := false, false
	endWord := func() {
		if inWord {
			if !redirect {
				words = append(words, w.String())
			}
			redirect = false
			w.Reset()
			inWord = false
		}
	}
	endCmd := func() {
		endWord()
		if len(words) > 0 {
			cmds = append(cmds, words)
		}
		words = nil
		redirect = false
	}
	var quote rune
	rs := []rune(line)
	for i := 0; i < len(rs); i++ {
		r := rs[i]
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				w.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == '#' && !inWord:
			endCmd()
			return cmds
		case r == ' ' || r == '\t':
			endWord()
		case r == ';' || r == '|' || r == '&' || r == '(' || r == ')':
			endCmd()
		case r == '$' && i+1 < len(rs) && rs[i+1] == '(':
			endCmd()
			i++
		case (r == '<' || r == '>') && i+1 < len(rs) && rs[i+1] == '(':
			endCmd() // process substitution
			i++
		case r == '<' || r == '>':
			if inWord && strings.Trim(w.String(), "0123456789") == "" {
				w.Reset() // a file descriptor: 2>&1
				inWord = false
			}
			endWord()
			for i+1 < len(rs) && (rs[i+1] == '>' || rs[i+1] == '<' || rs[i+1] == '&' || rs[i+1] == '-' || rs[i+1] == '\'') {
				if rs[i+1] == '\'' { // <<'EOF'
					break
				}
				i++
			}
			redirect = true // the next word is the target
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	endCmd()
	return cmds
}

// makeTargets returns the targets the Makefile defines.
func makeTargets(makefile string) (map[string]bool, error) {
	f, err := os.Open(makefile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rule := regexp.MustCompile(`^([A-Za-z0-9_./%-]+(?:[ \t]+[A-Za-z0-9_./%-]+)*)[ \t]*::?(?:[^=]|$)`)
	targets := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := rule.FindStringSubmatch(sc.Text()); m != nil {
			for _, t := range strings.Fields(m[1]) {
				if !strings.HasPrefix(t, ".") {
					targets[t] = true
				}
			}
		}
	}
	return targets, sc.Err()
}

// markdownFiles are README.md and docs/*.md of root, relative to it, sorted.
func markdownFiles(root string) ([]string, error) {
	docs, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		return nil, err
	}
	files := []string{"README.md"}
	for _, d := range docs {
		rel, err := filepath.Rel(root, d)
		if err != nil {
			return nil, err
		}
		files = append(files, rel)
	}
	sort.Strings(files[1:])
	return files, nil
}
