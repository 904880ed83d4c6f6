module tunesmith.test/gorender

go 1.19
