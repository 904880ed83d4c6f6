// Command gorender renders Ollama TEMPLATEs with Go's text/template the way Ollama's server does, for
// tests/export/test_ollama.py. It reads a JSON array of cases on stdin and writes a JSON array of results.
//
// Mirrored from Ollama (server/routes.go ChatHandler, template/template.go): the Modelfile SYSTEM is put
// first unless the request starts with a system message; consecutive messages of one role (tool results
// excepted) are merged with "\n\n" (collate); the template is parsed with missingkey=zero and Ollama's
// one extra function (json) and executed with the map Ollama passes on its .Messages path. The thinking
// tags Ollama infers from a template (thinking/template.go InferTags) are reported too.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Thinking  string `json:"thinking,omitempty"`
	ToolCalls []any  `json:"tool_calls,omitempty"`
	ToolName  string `json:"tool_name,omitempty"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
	Think    *bool     `json:"think"`
}

type Result struct {
	Text  string    `json:"text"`
	Error string    `json:"error,omitempty"`
	Tags  [2]string `json:"thinking_tags"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(c Case) Result {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return Result{Error: err.Error()}
	}
	msgs := c.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && c.System != "" {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, messages := collate(msgs)
	think, isThinkSet := false, c.Think != nil
	if isThinkSet {
		think = *c.Think
	}
	var b strings.Builder
	err = tmpl.Execute(&b, map[string]any{
		"System":      system,
		"Messages":    messages,
		"Tools":       []any(nil),
		"Response":    "",
		"Think":       think,
		"IsThinkSet":  isThinkSet,
		"Query":       "",
		"Document":    "",
		"Instruction": "",
	})
	if err != nil {
		return Result{Error: err.Error()}
	}
	open, close := inferTags(tmpl)
	return Result{Text: b.String(), Tags: [2]string{open, close}}
}

// inferTags follows Ollama's thinking.InferTags: the text nodes around {{ .Thinking }} inside a range
// over .Messages are the thinking tags (both "" when the template has none).
func inferTags(t *template.Template) (string, string) {
	var ancestors []parse.Node
	open, close := "", ""
	var visit func(n parse.Node)
	visit = func(n parse.Node) {
		if n == nil {
			return
		}
		ancestors = append(ancestors, n)
		defer func() { ancestors = ancestors[:len(ancestors)-1] }()
		switch x := n.(type) {
		case *parse.FieldNode:
			if len(x.Ident) > 0 && x.Ident[0] == "Thinking" {
				var rng *parse.RangeNode
				for i := len(ancestors) - 1; i >= 0 && rng == nil; i-- {
					rng, _ = ancestors[i].(*parse.RangeNode)
				}
				if rng == nil || !rangesOverMessages(rng) {
					return
				}
				for i := len(ancestors) - 1; i >= 0; i-- {
					if l, ok := ancestors[i].(*parse.ListNode); ok {
						if tn, ok := l.Nodes[0].(*parse.TextNode); ok {
							open = strings.TrimSpace(tn.String())
						}
						if tn, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
							close = strings.TrimSpace(tn.String())
						}
						break
					}
				}
			}
		case *parse.ListNode:
			for _, c := range x.Nodes {
				visit(c)
			}
		case *parse.IfNode:
			visit(&x.BranchNode)
		case *parse.RangeNode:
			visit(&x.BranchNode)
		case *parse.WithNode:
			visit(&x.BranchNode)
		case *parse.BranchNode:
			visit(x.Pipe)
			if x.List != nil {
				visit(x.List)
			}
			if x.ElseList != nil {
				visit(x.ElseList)
			}
		case *parse.ActionNode:
			visit(x.Pipe)
		case *parse.PipeNode:
			for _, c := range x.Cmds {
				visit(c)
			}
		case *parse.CommandNode:
			for _, a := range x.Args {
				visit(a)
			}
		}
	}
	visit(t.Root)
	return open, close
}

// rangesOverMessages: the range's pipeline holds the field .Messages (Ollama's rangeUsesField).
func rangesOverMessages(rng *parse.RangeNode) bool {
	for _, cmd := range rng.Pipe.Cmds {
		for _, arg := range cmd.Args {
			if f, ok := arg.(*parse.FieldNode); ok && f.Ident[0] == "Messages" {
				return true
			}
		}
	}
	return false
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	results := make([]Result, len(cases))
	for i, c := range cases {
		results[i] = render(c)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
