"""One script per model, torchvision-references style: get_args_parser, main, train_one_epoch, evaluate."""
