module example.com/sluice-go-filter

go 1.24
